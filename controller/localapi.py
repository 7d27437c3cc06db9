"""The controller's local API for the CLI: JSON over HTTP on a Unix socket.

    POST /apply   {"objects": [...]}  -> 200 {"events": [...]} | 422 {"errors": [...]}
    POST /delete  {"objects": [...]}  -> 200 {"events": [...]} | 404/422 {"errors": [...]}
    GET  /objects?kind=Pod[&namespace=demo]   -> 200 {"items": [...], "resourceVersion": "N"}
    GET  /status                              -> 200 {...} (the controller's own view)
    GET  /healthz                             -> 200 ok

The socket is created mode 0600 in the cluster's run dir: only root on this machine can
use it, which is the same trust as running ``ip netns`` by hand.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from aiohttp import web

from shoal.controller.manifests import KINDS, ManifestError
from shoal.controller.store import Store

log = logging.getLogger(__name__)

MAX_BODY = 8 * 1024 * 1024
# Kubernetes objects nest a dozen levels; anything far deeper is an attack on the recursive
# code after the parser (copies, JSON encoding in the store), so it is refused up front.
MAX_DEPTH = 64


def nesting_depth(value: Any, limit: int) -> int:
    """Depth of nested lists/dicts, counted without recursion; stops counting past ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _pod_specs(obj: Any) -> list[tuple[str, dict]]:
    """(field, pod spec) of a Pod or of a Deployment's pod template."""
    if not isinstance(obj, dict) or not isinstance(obj.get("spec"), dict):
        return []
    if obj.get("kind") == "Pod":
        return [("spec", obj["spec"])]
    template = obj["spec"].get("template")
    if obj.get("kind") == "Deployment" and isinstance(template, dict) and isinstance(template.get("spec"), dict):
        return [("spec.template.spec", template["spec"])]
    return []


def host_paths_refused(objects: list[Any], protected: Sequence[Path]) -> list[str]:
    """hostPath volumes (of Pods and pod templates written through this API) that reach a
    ``protected`` folder: the folder itself, anything in it, or a parent of it.

    The mesh's state lives there: the CA, node and waypoint credentials, the agents' flows
    sockets (which a waypoint writes its L7 flows to, trusted because nothing else can reach
    them). The waypoint launcher writes its Deployments into the store directly, not here,
    so it is the only one that mounts them, as Pod Security "baseline" keeps hostPath to
    privileged namespaces on Kubernetes (agent/README.md, "Who may write flows")."""
    roots = [Path(os.path.realpath(p)) for p in protected]
    problems = []
    for index, obj in enumerate(objects):
        for field, spec in _pod_specs(obj):
            volumes = spec.get("volumes")
            for v, volume in enumerate(volumes if isinstance(volumes, list) else []):
                host = volume.get("hostPath") if isinstance(volume, dict) else None
                path = host.get("path") if isinstance(host, dict) else None
                if not isinstance(path, str) or not path.startswith("/"):
                    continue
                real = Path(os.path.realpath(path))
                for root in roots:
                    if real == root or root in real.parents or real in root.parents:
                        problems.append(f"objects[{index}] {field}.volumes[{v}].hostPath.path: {path} reaches "
                                        f"the mesh's state under {root}: refused (only the mesh's own pods mount it)")
                        break
    return problems


def build_app(store: Store, status: Callable[[], dict[str, Any]], on_error: Callable[[str], None] = lambda _: None,
              protected_host_paths: Sequence[Path] = ()) -> web.Application:
    """``protected_host_paths``: folders no pod written through this API may mount (``host_paths_refused``)."""
    app = web.Application(client_max_size=MAX_BODY)

    async def read_objects(request: web.Request) -> list[Any]:
        try:
            body = json.loads((await request.read()).decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise _bad_request(f"request body is not JSON: {e}", "not_json") from None
        except RecursionError:
            raise _bad_request(f"request body nests deeper than {MAX_DEPTH} levels",
                               "too_deep") from None
        if nesting_depth(body, MAX_DEPTH) > MAX_DEPTH:
            raise _bad_request(f"request body nests deeper than {MAX_DEPTH} levels", "too_deep")
        if not isinstance(body, dict) or not isinstance(body.get("objects"), list):
            raise _bad_request('expected {"objects": [...]}')
        return body["objects"]

    def _bad_request(message: str, reason: str = "bad_request") -> web.HTTPException:
        on_error(reason)
        log.warning("local API: refused a request: %s", message)
        return web.HTTPBadRequest(text=json.dumps({"errors": [message]}), content_type="application/json")

    def write(operation: Callable[[list[Any]], list], admit: bool) -> Callable:
        async def handler(request: web.Request) -> web.Response:
            objects = await read_objects(request)
            refused = host_paths_refused(objects, protected_host_paths) if admit else []
            if refused:
                on_error("host_path")
                log.warning("refused %s: %s", request.path, "; ".join(refused))
                return web.json_response({"errors": refused}, status=422)
            try:
                events = operation(objects)
            except ManifestError as e:
                on_error("invalid_manifest")
                log.warning("refused %s: %s", request.path, e)
                code = 404 if all(err.endswith(": not found") for err in e.errors) else 422
                return web.json_response({"errors": e.errors}, status=code)
            return web.json_response({"events": [
                {"type": ev.type, "kind": ev.object["kind"], "namespace": ev.object["metadata"].get("namespace", ""),
                 "name": ev.object["metadata"]["name"],
                 "resourceVersion": ev.object["metadata"].get("resourceVersion", "")} for ev in events]})
        return handler

    async def objects(request: web.Request) -> web.Response:
        kind = request.query.get("kind", "")
        if kind not in KINDS:
            raise _bad_request(f"unknown kind {kind!r}", "unknown_kind")
        items = store.list(kind, request.query.get("namespace"))
        return web.json_response({"items": items, "resourceVersion": str(store.resource_version)})

    async def status_handler(request: web.Request) -> web.Response:
        return web.json_response(status())

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_post("/apply", write(store.apply, admit=True))
    app.router.add_post("/delete", write(store.delete, admit=False))
    app.router.add_get("/objects", objects)
    app.router.add_get("/status", status_handler)
    app.router.add_get("/healthz", healthz)
    return app


async def serve_unix(app: web.Application, path: Path) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    old = os.umask(0o177)
    try:
        await web.UnixSite(runner, str(path)).start()
    finally:
        os.umask(old)
    return runner
