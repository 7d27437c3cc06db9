"""Per-node credentials of the local cluster: a token that names its holder and proves it.

``shoal up`` keeps one cluster key (0600, in the run dir, read by the controller only) and
gives each node a token written only into that node's own state directory; the controller's
launcher does the same for each waypoint. A token is ``v1.<name>.<mac>`` with
``mac = HMAC-SHA256(key, name)``: the controller recomputes the MAC, so the name inside is
the caller's proven name, and holding node-1's token gives no way to make node-2's (unlike
the shared bootstrap token + self-declared ``x-shoal-node`` header this replaces).

In Kubernetes the same role is played by the pod's projected ServiceAccount token
(controller/auth.py, TokenReview); this module is not used there.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

VERSION = "v1"
# Node names are DNS labels; waypoint callers are ``waypoint-<namespace>-<name>``.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_CONTEXT = b"shoal-node-credential/v1\0"


class CredentialError(ValueError):
    """A token that is malformed or was not issued with this cluster's key."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def write_secret_file(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` readable by its owner only (0600 from creation on)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    tmp.replace(path)


class NodeCredentials:
    def __init__(self, key: bytes) -> None:
        if len(key) < 32:
            raise ValueError("the credential key must be at least 32 bytes")
        self._key = key

    @classmethod
    def load_or_create(cls, path: Path) -> "NodeCredentials":
        """The cluster key at ``path`` (hex); created 0600 when missing."""
        if not path.exists():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass   # a concurrent creator won: read theirs
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(secrets.token_hex(32))
        text = path.read_text().strip()
        try:
            return cls(bytes.fromhex(text))
        except ValueError as err:
            raise ValueError(f"{path}: not a credential key ({err})") from None

    def _mac(self, name: str) -> str:
        return _b64(hmac.new(self._key, _CONTEXT + name.encode(), hashlib.sha256).digest())

    def issue(self, name: str) -> str:
        if not _NAME.match(name):
            raise ValueError(f"not a node name: {name!r}")
        return f"{VERSION}.{name}.{self._mac(name)}"

    def issue_file(self, name: str, path: Path) -> Path:
        """Writes ``name``'s token to ``path`` (0600): that holder's only copy."""
        write_secret_file(path, self.issue(name) + "\n")
        return path

    def verify(self, token: str) -> str:
        """Returns the name the token was issued to; raises CredentialError."""
        version, _, rest = token.partition(".")
        name, _, mac = rest.rpartition(".")
        if version != VERSION or not name or not mac:
            raise CredentialError("not a Shoal node credential (expected v1.<node>.<mac>)")
        if not hmac.compare_digest(mac.encode(), self._mac(name).encode()):
            raise CredentialError(f"credential for {name!r} was not issued by this cluster")
        return name
