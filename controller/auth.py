"""Node authentication for the config stream, the CA and ``/status``.

The caller's credential arrives as ``authorization: Bearer <token>``; the node is derived
from the credential, never from anything the caller declares about itself:

* Local cluster: a per-node credential issued by ``shoal up`` (shoal/credentials.py) into
  that node's own state directory. It names the node and carries a MAC made with the
  cluster key, so node-1's credential can never pass as node-2.
* Kubernetes: the agent's or proxy's projected ServiceAccount token (audience ``shoal``,
  bound to its pod), checked with a TokenReview. It must belong to an allowed
  ServiceAccount, be meant for the wanted audience, and be bound to a pod that still
  exists (same UID); the node is that pod's ``spec.nodeName``, read from the API server.

Every refusal raises AuthError with a short ``reason`` (the metric label) and a message
saying what was wrong.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Protocol, Sequence

from shoal.credentials import CredentialError, NodeCredentials

log = logging.getLogger(__name__)

EXTRA_NODE_NAME = "authentication.kubernetes.io/node-name"
EXTRA_POD_NAME = "authentication.kubernetes.io/pod-name"
EXTRA_POD_UID = "authentication.kubernetes.io/pod-uid"

Metadata = Sequence[tuple[str, str | bytes]]


class AuthError(Exception):
    """The caller did not prove who it is; ``reason`` labels the refusal metric."""

    def __init__(self, message: str, reason: str = "bad_credential") -> None:
        super().__init__(message)
        self.reason = reason


class AuthUnavailable(AuthError):
    """The credential could not be checked now (API server unreachable): retry later."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "review_failed")


def _metadata(metadata: Metadata | None, key: str) -> str:
    for k, v in metadata or ():
        if k == key:
            return v.decode(errors="replace") if isinstance(v, bytes) else v
    return ""


def bearer_token(metadata: Metadata | None) -> str:
    value = _metadata(metadata, "authorization")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("missing 'authorization: Bearer <token>' metadata", "no_credential")
    return token.strip()


class Authenticator(Protocol):
    async def authenticate(self, metadata: Metadata | None) -> str:
        """Returns the caller's node name; raises AuthError."""


class NodeCredentialAuthenticator:
    """Local cluster: the per-node credential names the node and proves it."""

    def __init__(self, credentials: NodeCredentials) -> None:
        self._credentials = credentials

    async def authenticate(self, metadata: Metadata | None) -> str:
        try:
            return self._credentials.verify(bearer_token(metadata))
        except CredentialError as err:
            raise AuthError(str(err)) from None


# token -> TokenReview status dict ({"authenticated", "error", "audiences",
# "user": {"username", "extra"}})
TokenReviewer = Callable[[str], Awaitable[dict]]
# (namespace, pod) -> {"uid", "nodeName"} read from the API server, or None when gone
PodLookup = Callable[[str, str], Awaitable[dict | None]]


class TokenReviewAuthenticator:
    """Kubernetes: TokenReview of the caller's pod-bound ServiceAccount token."""

    def __init__(self, review: TokenReviewer, allowed_accounts: Sequence[str],
                 pod_lookup: PodLookup, audiences: Sequence[str] = ()) -> None:
        self._review = review
        self._allowed = {f"system:serviceaccount:{a.replace('/', ':')}" for a in allowed_accounts}
        self._pod_lookup = pod_lookup
        self._audiences = set(audiences)

    async def authenticate(self, metadata: Metadata | None) -> str:
        token = bearer_token(metadata)
        status = await self._review(token)
        if not status.get("authenticated"):
            error = status.get("error") or "not authenticated"
            raise AuthError(f"token rejected by TokenReview: {error}",
                            "expired" if "expired" in error else "rejected")
        if self._audiences and not self._audiences & set(status.get("audiences") or ()):
            # An API server that ignores spec.audiences answers with none: refuse that too.
            raise AuthError(f"token is not meant for audience {sorted(self._audiences)} "
                            f"(reviewed for {status.get('audiences') or 'the API server'})",
                            "wrong_audience")
        user = status.get("user") or {}
        username = user.get("username", "")
        if username not in self._allowed:
            raise AuthError(f"{username!r} is not an agent service account", "not_agent")
        extra = user.get("extra") or {}
        pod_name = (extra.get(EXTRA_POD_NAME) or [""])[0]
        pod_uid = (extra.get(EXTRA_POD_UID) or [""])[0]
        if not pod_name:
            raise AuthError("the token is not bound to a pod (use a projected "
                            "serviceAccountToken volume)", "not_pod_bound")
        namespace = username.split(":")[2]
        pod = await self._pod_lookup(namespace, pod_name)
        if pod is None or (pod_uid and pod.get("uid") != pod_uid):
            raise AuthError(f"the token's pod {namespace}/{pod_name} no longer exists",
                            "pod_gone")
        node = pod.get("nodeName") or ""
        if not node:
            raise AuthError(f"the token's pod {namespace}/{pod_name} is not on a node",
                            "not_scheduled")
        claimed = (extra.get(EXTRA_NODE_NAME) or [node])[0]
        if claimed != node:
            raise AuthError(f"the token names node {claimed!r} but its pod runs on {node!r}",
                            "node_mismatch")
        return node


def kubernetes_token_reviewer(api_client, audiences: Sequence[str] = ()) -> TokenReviewer:
    """A TokenReviewer calling the API server through kubernetes_asyncio."""
    from aiohttp import ClientError
    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.exceptions import ApiException

    api = client.AuthenticationV1Api(api_client)

    async def review(token: str) -> dict:
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(
            token=token, audiences=list(audiences) or None))
        try:
            result = await api.create_token_review(body)
        except (ApiException, ClientError, OSError, asyncio.TimeoutError) as err:
            raise AuthUnavailable(f"TokenReview failed: {err}") from None
        status = result.status
        return {
            "authenticated": bool(status.authenticated),
            "error": status.error or "",
            "audiences": list(status.audiences or []),
            "user": {
                "username": status.user.username if status.user else "",
                "extra": dict(status.user.extra or {}) if status.user else {},
            },
        }

    return review


def kubernetes_pod_lookup(api_client) -> PodLookup:
    """Reads the pod from the API server (not a cache: a just-deleted pod must not pass)."""
    from aiohttp import ClientError
    from kubernetes_asyncio import client
    from kubernetes_asyncio.client.exceptions import ApiException

    api = client.CoreV1Api(api_client)

    async def lookup(namespace: str, name: str) -> dict | None:
        try:
            pod = await api.read_namespaced_pod(name, namespace)
        except ApiException as err:
            if err.status == 404:
                return None
            raise AuthUnavailable(f"reading pod {namespace}/{name} failed: {err.reason}") from None
        except (ClientError, OSError, asyncio.TimeoutError) as err:
            raise AuthUnavailable(f"reading pod {namespace}/{name} failed: {err}") from None
        return {"uid": pod.metadata.uid, "nodeName": pod.spec.node_name if pod.spec else None}

    return lookup
