"""Node authentication for the config stream and the CA.

* Locally: the cluster's bootstrap token (``SHOAL_TOKEN_FILE``) as ``authorization: Bearer``;
  the node is the one named in ``x-shoal-node``. Every local node shares the token, so it
  proves membership of the cluster, not which node is calling (all local nodes are
  processes of one machine anyway).
* In Kubernetes: the agent's ServiceAccount token, checked with a TokenReview. It must
  belong to an allowed ServiceAccount, and the node is taken from the token itself (the
  ``authentication.kubernetes.io/node-name`` extra of a bound token, or else the node of
  the pod named in ``.../pod-name``), so a node cannot claim another node's name.
"""
from __future__ import annotations

import hmac
import logging
from typing import Awaitable, Callable, Protocol, Sequence

log = logging.getLogger(__name__)

NODE_METADATA = "x-shoal-node"
EXTRA_NODE_NAME = "authentication.kubernetes.io/node-name"
EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"

Metadata = Sequence[tuple[str, str | bytes]]


class AuthError(Exception):
    """The caller did not prove who it is."""


def _metadata(metadata: Metadata | None, key: str) -> str:
    for k, v in metadata or ():
        if k == key:
            return v.decode() if isinstance(v, bytes) else v
    return ""


def bearer_token(metadata: Metadata | None) -> str:
    value = _metadata(metadata, "authorization")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthError("missing 'authorization: Bearer <token>' metadata")
    return token.strip()


class Authenticator(Protocol):
    async def authenticate(self, metadata: Metadata | None) -> str:
        """Returns the caller's node name; raises AuthError."""


class BootstrapTokenAuthenticator:
    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("empty bootstrap token")
        self._token = token.encode()

    async def authenticate(self, metadata: Metadata | None) -> str:
        token = bearer_token(metadata)
        if not hmac.compare_digest(token.encode(), self._token):
            raise AuthError("bad bootstrap token")
        node = _metadata(metadata, NODE_METADATA)
        if not node:
            raise AuthError(f"missing {NODE_METADATA} metadata")
        return node


# token -> TokenReview status dict ({"authenticated", "user": {"username", "extra"}})
TokenReviewer = Callable[[str], Awaitable[dict]]
PodNodeLookup = Callable[[str, str], str | None]   # (namespace, pod) -> node


class TokenReviewAuthenticator:
    """Kubernetes: TokenReview of the caller's ServiceAccount token."""

    def __init__(self, review: TokenReviewer, allowed_accounts: Sequence[str],
                 pod_node: PodNodeLookup) -> None:
        self._review = review
        self._allowed = {f"system:serviceaccount:{a.replace('/', ':')}" for a in allowed_accounts}
        self._pod_node = pod_node

    async def authenticate(self, metadata: Metadata | None) -> str:
        token = bearer_token(metadata)
        status = await self._review(token)
        if not status.get("authenticated"):
            raise AuthError(f"token rejected by TokenReview: {status.get('error', 'not authenticated')}")
        user = status.get("user") or {}
        username = user.get("username", "")
        if username not in self._allowed:
            raise AuthError(f"{username!r} is not an agent service account")
        extra = user.get("extra") or {}
        nodes = extra.get(EXTRA_NODE_NAME) or []
        if nodes:
            return nodes[0]
        pods = extra.get(EXTRA_POD_NAME) or []
        namespace = username.split(":")[2]
        if pods:
            node = self._pod_node(namespace, pods[0])
            if node:
                return node
        raise AuthError("the token is not bound to a pod on a known node")


def kubernetes_token_reviewer(api_client, audiences: Sequence[str] = ()) -> TokenReviewer:
    """A TokenReviewer calling the API server through kubernetes_asyncio."""
    from kubernetes_asyncio import client

    api = client.AuthenticationV1Api(api_client)

    async def review(token: str) -> dict:
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(
            token=token, audiences=list(audiences) or None))
        result = await api.create_token_review(body)
        status = result.status
        return {
            "authenticated": bool(status.authenticated),
            "error": status.error or "",
            "user": {
                "username": status.user.username if status.user else "",
                "extra": dict(status.user.extra or {}) if status.user else {},
            },
        }

    return review
