"""A small synchronous client for the controller's local API (HTTP over a Unix socket)."""
from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlencode


class ApiError(RuntimeError):
    def __init__(self, status: int, errors: list[str]):
        super().__init__("; ".join(errors))
        self.status = status
        self.errors = errors


class ControllerUnavailable(RuntimeError):
    pass


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class ApiClient:
    def __init__(self, socket_path: Path, timeout: float = 30.0):
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=payload, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise ControllerUnavailable(f"the controller is not running ({self.socket_path}: {e.strerror})") from None
        finally:
            conn.close()
        try:
            decoded = json.loads(data) if data else {}
        except json.JSONDecodeError:
            decoded = {"errors": [data.decode(errors="replace")]}
        if resp.status >= 400:
            raise ApiError(resp.status, decoded.get("errors", [f"HTTP {resp.status}"]))
        return decoded

    def healthy(self) -> bool:
        try:
            self._request("GET", "/healthz")
        except (ControllerUnavailable, ApiError, OSError):
            return False
        return True

    def apply(self, objects: list[Any]) -> list[dict[str, str]]:
        return self._request("POST", "/apply", {"objects": objects})["events"]

    def delete(self, objects: list[Any]) -> list[dict[str, str]]:
        return self._request("POST", "/delete", {"objects": objects})["events"]

    def list(self, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
        query = {"kind": kind, **({"namespace": namespace} if namespace else {})}
        return self._request("GET", f"/objects?{urlencode(query)}")["items"]

    def status(self) -> dict[str, Any]:
        return self._request("GET", "/status")
