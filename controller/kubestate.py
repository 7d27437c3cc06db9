"""The controller's own state kept in the Kubernetes API (Kubernetes mode), so any node can
run the controller and a restart changes nothing:

* Secret ``shoal-ca`` (Istio's ``cacerts`` keys: ca-cert.pem, ca-key.pem, cert-chain.pem,
  root-cert.pem, optional extra-roots.pem): the CA. Supply your own root or intermediate by
  creating it before the install; otherwise the first controller generates a root and
  creates the Secret (a concurrent creator wins, the loser reads theirs).
* ConfigMap ``shoal-ca-root`` (key ``root-cert.pem``): the trust bundle, published for the
  agents and waypoints to mount (``SHOAL_CA_BUNDLE``).
* ConfigMap ``shoal-identities``: the numeric identities, key ``<namespace>.<sa>`` (a
  namespace has no dot, so the first dot splits), value the number. New allocations are
  merged in (optimistic concurrency on resourceVersion) before a push uses them.
"""
from __future__ import annotations

import base64
import binascii
import logging
import os
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from shoal.controller.ca import CertificateAuthority
from shoal.controller.identity import Allocation

log = logging.getLogger(__name__)

class CASecretError(RuntimeError):
    """The CA Secret exists but cannot be used: the controller stops rather than replace it."""

    def __str__(self) -> str:
        return (f"{self.args[0]}. Refusing to start: generating a new root would invalidate "
                "every certificate in the mesh. Fix the Secret, or delete it to start a new mesh root.")


CA_FILES = ("ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem", "extra-roots.pem")


class KubernetesState:
    def __init__(self, api_client: client.ApiClient, namespace: str = "shoal-system",
                 ca_secret: str = "shoal-ca", roots_configmap: str = "shoal-ca-root",
                 identities_configmap: str = "shoal-identities") -> None:
        self.core = client.CoreV1Api(api_client)
        self.namespace = namespace
        self.ca_secret, self.roots_configmap = ca_secret, roots_configmap
        self.identities_configmap = identities_configmap

    # -- CA ----------------------------------------------------------------------------------

    async def load_ca(self, ca_dir: Path, trust_domain: str, create: bool = True,
                      **ca_options) -> CertificateAuthority | None:
        """Materializes the CA Secret into ``ca_dir`` (created 0700) and loads it; generates
        and stores one when the Secret does not exist, unless not ``create`` (a standby,
        which never writes: then None until the leader has created it)."""
        ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in CA_FILES:
            (ca_dir / stale).unlink(missing_ok=True)
        secret = await self._read_secret()
        if secret is None and not create:
            return None
        if secret is None:
            generated = CertificateAuthority.load_or_create(ca_dir, trust_domain, **ca_options)
            data = {name: base64.b64encode((ca_dir / name).read_bytes()).decode()
                    for name in CA_FILES if (ca_dir / name).exists()}
            body = client.V1Secret(metadata=client.V1ObjectMeta(name=self.ca_secret),
                                   type="Opaque", data=data)
            try:
                await self.core.create_namespaced_secret(self.namespace, body)
                log.info("created CA Secret %s/%s with a new root", self.namespace, self.ca_secret)
                return generated
            except ApiException as err:
                if err.status != 409:
                    raise
                log.info("CA Secret %s/%s appeared meanwhile: using it", self.namespace,
                         self.ca_secret)
                secret = await self._read_secret()
                for stale in CA_FILES:
                    (ca_dir / stale).unlink(missing_ok=True)
        where = f"Secret {self.namespace}/{self.ca_secret}"
        data = secret.data or {}
        missing = [name for name in ("ca-cert.pem", "ca-key.pem") if name not in data]
        if missing:
            raise CASecretError(f"{where}: missing {', '.join(missing)} (has: "
                                f"{', '.join(sorted(data)) or 'nothing'})")
        for name, value in data.items():
            if name in CA_FILES:
                try:
                    content = base64.b64decode(value, validate=True)
                except (binascii.Error, ValueError) as err:
                    raise CASecretError(f"{where}: {name} is not base64 ({err})") from None
                path = ca_dir / name
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(content)
        try:
            return CertificateAuthority.load_or_create(ca_dir, trust_domain, **ca_options)
        except (ValueError, TypeError, UnsupportedAlgorithm) as err:
            # Never a new root in its place: every certificate and node would stop matching.
            raise CASecretError(f"{where}: {err}") from None

    async def _read_secret(self):
        try:
            return await self.core.read_namespaced_secret(self.ca_secret, self.namespace)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    async def publish_roots(self, roots_pem: str) -> None:
        """Creates or updates the trust bundle ConfigMap."""
        body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=self.roots_configmap),
                                  data={"root-cert.pem": roots_pem})
        try:
            await self.core.replace_namespaced_config_map(self.roots_configmap, self.namespace, body)
        except ApiException as err:
            if err.status != 404:
                raise
            await self.core.create_namespaced_config_map(self.namespace, body)

    # -- identities ------------------------------------------------------------------------------

    async def load_identities(self) -> list[Allocation]:
        try:
            cm = await self.core.read_namespaced_config_map(self.identities_configmap,
                                                            self.namespace)
        except ApiException as err:
            if err.status == 404:
                return []
            raise
        allocations = []
        for key, value in (cm.data or {}).items():
            namespace, _, sa = key.partition(".")
            if not sa or not value.isdigit():
                log.warning("ConfigMap %s: ignoring malformed entry %r=%r",
                            self.identities_configmap, key, value)
                continue
            allocations.append((int(value), namespace, sa))
        return allocations

    async def save_identities(self, allocations: list[Allocation], attempts: int = 5) -> None:
        """Merges new allocations into the ConfigMap (re-reading on a conflict)."""
        new = {f"{ns}.{sa}": str(number) for number, ns, sa in allocations}
        for _ in range(attempts):
            try:
                cm = await self.core.read_namespaced_config_map(self.identities_configmap,
                                                                self.namespace)
            except ApiException as err:
                if err.status != 404:
                    raise
                body = client.V1ConfigMap(
                    metadata=client.V1ObjectMeta(name=self.identities_configmap), data=new)
                try:
                    await self.core.create_namespaced_config_map(self.namespace, body)
                    return
                except ApiException as create_err:
                    if create_err.status != 409:
                        raise
                    continue
            cm.data = {**(cm.data or {}), **new}
            try:
                await self.core.replace_namespaced_config_map(self.identities_configmap,
                                                              self.namespace, cm)
                return
            except ApiException as err:
                if err.status != 409:
                    raise
        raise RuntimeError(f"ConfigMap {self.identities_configmap}: too many write conflicts")
