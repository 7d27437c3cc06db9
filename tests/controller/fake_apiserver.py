"""A local HTTP server speaking the Kubernetes list/watch wire protocol, for the real client.

JSON lists with ``metadata.resourceVersion`` and ``limit``/``continue`` pagination; watches
as chunked streams of newline-delimited ADDED/MODIFIED/DELETED/BOOKMARK events from a
resourceVersion; a compacted history answers old versions with an ERROR event carrying a
410 Status (as the API server does inside a 200 stream) and old continue tokens with an
HTTP 410; TokenReview of bound ServiceAccount tokens (audiences, expiry, the bound pod's
existence and UID, as the API server checks them); GET of one pod; Secrets and ConfigMaps
with resourceVersion conflicts; and for the real kubectl: discovery, OpenAPI v3 documents
declaring ``fieldValidation``, and server-side apply (``metadata.generation`` moves only
when the applied object changed). Good enough to drive kubernetes_asyncio, not a real API
server.
"""
from __future__ import annotations

import asyncio
import base64
import copy
import json
import secrets
import time
import uuid

import yaml
from aiohttp import web

RESOURCES = {
    ("api/v1", "namespaces"): ("Namespace", "v1"),
    ("api/v1", "pods"): ("Pod", "v1"),
    ("api/v1", "services"): ("Service", "v1"),
    ("api/v1", "serviceaccounts"): ("ServiceAccount", "v1"),
    ("apis/discovery.k8s.io/v1", "endpointslices"): ("EndpointSlice", "discovery.k8s.io/v1"),
    ("apis/security.shoal.io/v1", "authorizationpolicies"): ("AuthorizationPolicy", "security.shoal.io/v1"),
    ("apis/security.shoal.io/v1", "peerauthentications"): ("PeerAuthentication", "security.shoal.io/v1"),
    ("apis/gateway.networking.k8s.io/v1", "gateways"): ("Gateway", "gateway.networking.k8s.io/v1"),
    ("apis/gateway.networking.k8s.io/v1", "httproutes"): ("HTTPRoute", "gateway.networking.k8s.io/v1"),
    ("apis/gateway.networking.k8s.io/v1", "grpcroutes"): ("GRPCRoute", "gateway.networking.k8s.io/v1"),
    ("apis/networking.shoal.io/v1", "trafficpolicies"): ("TrafficPolicy", "networking.shoal.io/v1"),
}


# What `kubectl apply --server-side` may write here (group, version, plural, namespaced),
# by kind: what `shoal install` renders, and the GatewayClass it adds.
APPLIED_KINDS = {
    "Namespace": ("", "v1", "namespaces", False),
    "ServiceAccount": ("", "v1", "serviceaccounts", True),
    "ConfigMap": ("", "v1", "configmaps", True),
    "Secret": ("", "v1", "secrets", True),
    "Service": ("", "v1", "services", True),
    "Pod": ("", "v1", "pods", True),
    "Deployment": ("apps", "v1", "deployments", True),
    "DaemonSet": ("apps", "v1", "daemonsets", True),
    "ClusterRole": ("rbac.authorization.k8s.io", "v1", "clusterroles", False),
    "ClusterRoleBinding": ("rbac.authorization.k8s.io", "v1", "clusterrolebindings", False),
    "Role": ("rbac.authorization.k8s.io", "v1", "roles", True),
    "RoleBinding": ("rbac.authorization.k8s.io", "v1", "rolebindings", True),
    "PodDisruptionBudget": ("policy", "v1", "poddisruptionbudgets", True),
    "CustomResourceDefinition": ("apiextensions.k8s.io", "v1", "customresourcedefinitions", False),
    "Gateway": ("gateway.networking.k8s.io", "v1", "gateways", True),
    "GatewayClass": ("gateway.networking.k8s.io", "v1", "gatewayclasses", False),
}
# Fields that are not the desired state: a re-apply that changes none of the rest is a no-op.
_STATUS_FIELDS = ("status",)


def _group_prefix(group, version):
    return f"api/{version}" if not group else f"apis/{group}/{version}"


def _status(code, reason, message):
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class FakeApiServer:
    def __init__(self, missing_kinds=()):
        self.rv = 100
        self.compacted = 0                      # versions <= this are gone
        self.objects: dict[str, dict[tuple[str, str], dict]] = {k: {} for k, _ in RESOURCES.values()}
        self.history: list[tuple[int, str, str, dict]] = []   # (rv, kind, type, object)
        self.watchers: list[tuple[str, asyncio.Queue]] = []
        self.missing = set(missing_kinds)
        self.tokens: dict[str, dict] = {}       # token -> TokenReview status.user
        self.bound: dict[str, dict] = {}        # token -> {audiences, expires, pod: (ns, name, uid)}
        self.reviews: list[dict] = []           # TokenReview specs received
        self.requests: list[str] = []
        self.stored: dict[tuple[str, str, str], dict] = {}   # (plural, ns, name): secrets, configmaps, leases
        self.failing: set[str] = set()          # plurals answered 503 (an API server outage for them)
        # Server-side applied objects (kind, namespace, name) -> object, with metadata.generation
        # bumped only when the applied spec changed, as the API server does.
        self.applied: dict[tuple[str, str, str], dict] = {}
        self.patches: list[tuple[str, str]] = []   # (path with query, content type) of each PATCH
        self.runner = None
        self.url = ""

    # -- test controls ----------------------------------------------------------------------

    def put(self, obj, event=None):
        obj = copy.deepcopy(obj)
        kind = obj["kind"]
        meta = obj.setdefault("metadata", {})
        key = (meta.get("namespace", ""), meta["name"])
        existed = key in self.objects[kind]
        meta.setdefault("uid", self.objects[kind][key]["metadata"]["uid"] if existed else str(uuid.uuid4()))
        self.rv += 1
        meta["resourceVersion"] = str(self.rv)
        self.objects[kind][key] = obj
        self._publish(kind, event or ("MODIFIED" if existed else "ADDED"), obj)

    def delete(self, kind, namespace, name):
        obj = self.objects[kind].pop((namespace, name))
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self._publish(kind, "DELETED", obj)

    def pod_token(self, namespace, pod, service_account="shoal-system/shoal-agent",
                  audiences=("shoal",), expires_in=3600.0):
        """A projected ServiceAccount token bound to ``pod`` (which must exist), as the
        kubelet gets one: the review answers with the pod-name/pod-uid (and node-name)
        extras while the pod exists with that UID, the token is unexpired and the
        requested audiences intersect the token's."""
        obj = self.objects["Pod"][(namespace, pod)]
        sa_ns, sa_name = service_account.split("/")
        token = "fake-jwt." + secrets.token_urlsafe(24)
        extra = {"authentication.kubernetes.io/pod-name": [pod],
                 "authentication.kubernetes.io/pod-uid": [obj["metadata"]["uid"]]}
        node = (obj.get("spec") or {}).get("nodeName")
        if node:
            extra["authentication.kubernetes.io/node-name"] = [node]
        self.tokens[token] = {"username": f"system:serviceaccount:{sa_ns}:{sa_name}",
                              "uid": str(uuid.uuid4()), "extra": extra}
        self.bound[token] = {"audiences": list(audiences), "expires": time.time() + expires_in,
                             "pod": (namespace, pod, obj["metadata"]["uid"])}
        return token

    def compact(self):
        """Forgets the history: watches from older versions get 410 Gone."""
        self.compacted = self.rv
        self.history.clear()

    def bookmark(self):
        for kind, queue in self.watchers:
            queue.put_nowait(("BOOKMARK", {"kind": kind, "apiVersion": "v1",
                                           "metadata": {"resourceVersion": str(self.rv)}}))

    def end_watches(self):
        for _, queue in self.watchers:
            queue.put_nowait(None)

    def _publish(self, kind, event, obj):
        self.history.append((self.rv, kind, event, obj))
        for watched, queue in self.watchers:
            if watched == kind:
                queue.put_nowait((event, obj))

    # -- serving ------------------------------------------------------------------------------

    async def start(self):
        app = web.Application()
        app.router.add_post("/apis/authentication.k8s.io/v1/tokenreviews", self._token_review)
        app.router.add_get("/api/v1/namespaces/{ns}/pods/{name}", self._get_pod)
        for prefix, plural in (("api/v1", "secrets"), ("api/v1", "configmaps"),
                               ("apis/coordination.k8s.io/v1", "leases")):
            base = f"/{prefix}/namespaces/{{ns}}/{plural}"
            app.router.add_get(f"{base}/{{name}}", self._get_stored(plural))
            app.router.add_post(base, self._create_stored(plural))
            app.router.add_put(f"{base}/{{name}}", self._replace_stored(plural))
        for (prefix, plural) in RESOURCES:
            app.router.add_get(f"/{prefix}/{plural}", self._handler(prefix, plural))
        # kubectl: version, legacy discovery, OpenAPI v3 (field validation), server-side apply.
        app.router.add_get("/version", self._version)
        app.router.add_get("/api", self._discover_core)
        app.router.add_get("/apis", self._discover_groups)
        app.router.add_get("/api/{version}", self._discover_resources)
        app.router.add_get("/apis/{group}/{version}", self._discover_resources)
        app.router.add_get("/openapi/v3", self._openapi_root)
        app.router.add_get("/openapi/v3/{path:.*}", self._openapi_group)
        app.router.add_patch("/{path:.*}", self._apply)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def kubeconfig(self, path, user="controller"):
        """A kubeconfig file at ``path`` for this server (a bearer token named after ``user``)."""
        path.write_text(f"""apiVersion: v1
kind: Config
clusters: [{{name: fake, cluster: {{server: "{self.url}"}}}}]
users: [{{name: {user}, user: {{token: {user}-token}}}}]
contexts: [{{name: fake, context: {{cluster: fake, user: {user}}}}}]
current-context: fake
""")
        return path

    async def stop(self):
        """Stops serving (idempotent: a test may stop it early to play an outage)."""
        if self.runner is None:
            return
        self.end_watches()
        await self.runner.cleanup()
        self.runner = None

    # -- secrets, configmaps, leases: get, create, replace with resourceVersion checks -----------

    def _outage(self, plural):
        if plural in self.failing:
            return web.json_response(_status(503, "ServiceUnavailable", "etcd is unavailable"),
                                     status=503)
        return None

    def _get_stored(self, plural):
        async def handle(request):
            if (outage := self._outage(plural)) is not None:
                return outage
            obj = self.stored.get((plural, request.match_info["ns"], request.match_info["name"]))
            if obj is None:
                return web.json_response(_status(404, "NotFound", f"{plural} not found"), status=404)
            return web.json_response(obj)
        return handle

    def _create_stored(self, plural):
        async def handle(request):
            if (outage := self._outage(plural)) is not None:
                return outage
            obj = await request.json()
            key = (plural, request.match_info["ns"], obj["metadata"]["name"])
            if key in self.stored:
                return web.json_response(_status(409, "AlreadyExists", "already exists"), status=409)
            self.rv += 1
            obj["metadata"].update(namespace=key[1], resourceVersion=str(self.rv))
            self.stored[key] = obj
            return web.json_response(obj, status=201)
        return handle

    def _replace_stored(self, plural):
        async def handle(request):
            if (outage := self._outage(plural)) is not None:
                return outage
            obj = await request.json()
            key = (plural, request.match_info["ns"], request.match_info["name"])
            current = self.stored.get(key)
            if current is None:
                return web.json_response(_status(404, "NotFound", f"{plural} not found"), status=404)
            sent = (obj.get("metadata") or {}).get("resourceVersion")
            if sent and sent != current["metadata"]["resourceVersion"]:
                return web.json_response(_status(409, "Conflict", "the object has been modified"),
                                         status=409)
            self.rv += 1
            obj["metadata"].update(namespace=key[1], resourceVersion=str(self.rv))
            self.stored[key] = obj
            return web.json_response(obj)
        return handle

    def _handler(self, prefix, plural):
        kind, api_version = RESOURCES[(prefix, plural)]

        async def handle(request):
            self.requests.append(str(request.rel_url))
            if kind in self.missing:
                return web.json_response(_status(404, "NotFound", "the server could not find "
                                                 "the requested resource"), status=404)
            if request.query.get("watch") in ("true", "1", "True"):
                return await self._watch(request, kind, api_version)
            return self._list(request, kind, api_version)
        return handle

    def _list(self, request, kind, api_version):
        limit = int(request.query.get("limit", "0") or 0)
        offset, list_rv = 0, self.rv
        token = request.query.get("continue")
        if token:
            state = json.loads(base64.b64decode(token))
            offset, list_rv = state["offset"], state["rv"]
            if list_rv <= self.compacted:
                return web.json_response(_status(410, "Expired", "The provided continue "
                                                 "parameter is too old"), status=410)
        items = [copy.deepcopy(o) for _, o in sorted(self.objects[kind].items())]
        for item in items:   # as the API server: list items carry no kind/apiVersion
            item.pop("kind", None)
            item.pop("apiVersion", None)
        page = items[offset:offset + limit] if limit else items[offset:]
        metadata = {"resourceVersion": str(list_rv)}
        if limit and offset + limit < len(items):
            metadata["continue"] = base64.b64encode(json.dumps(
                {"offset": offset + limit, "rv": list_rv}).encode()).decode()
        return web.json_response({"kind": f"{kind}List", "apiVersion": api_version,
                                  "metadata": metadata, "items": page})

    async def _watch(self, request, kind, api_version):
        since = int(request.query.get("resourceVersion") or 0)
        timeout = float(request.query.get("timeoutSeconds") or 3600)
        bookmarks = request.query.get("allowWatchBookmarks") in ("true", "True", "1")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)

        async def send(event_type, obj):
            await response.write(json.dumps({"type": event_type, "object": obj}).encode() + b"\n")

        if since and since < self.compacted:
            await send("ERROR", _status(410, "Expired", f"too old resource version: {since} "
                                        f"({self.compacted})"))
            await response.write_eof()
            return response
        queue: asyncio.Queue = asyncio.Queue()
        for rv, k, event, obj in self.history:
            if k == kind and rv > since:
                queue.put_nowait((event, obj))
        entry = (kind, queue)
        self.watchers.append(entry)
        try:
            deadline = asyncio.get_running_loop().time() + timeout
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
                if item is None:
                    break
                event, obj = item
                if event == "BOOKMARK" and not bookmarks:
                    continue
                await send(event, obj)
            await response.write_eof()
        except ConnectionResetError:
            pass   # the client went away: as a real server, just drop the stream
        finally:
            self.watchers.remove(entry)
        return response

    # -- kubectl apply --server-side ---------------------------------------------------------

    @staticmethod
    def _group_versions():
        versions = {}
        for kind, (group, version, plural, namespaced) in APPLIED_KINDS.items():
            versions.setdefault((group, version), []).append((kind, plural, namespaced))
        return versions

    async def _version(self, _request):
        return web.json_response({"major": "1", "minor": "32", "gitVersion": "v1.32.0-fake"})

    async def _discover_core(self, _request):
        return web.json_response({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})

    async def _discover_groups(self, _request):
        groups = sorted({g for g, _ in self._group_versions() if g})
        return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": [
            {"name": g, "versions": [{"groupVersion": f"{g}/v1", "version": "v1"}],
             "preferredVersion": {"groupVersion": f"{g}/v1", "version": "v1"}} for g in groups]})

    async def _discover_resources(self, request):
        group, version = request.match_info.get("group", ""), request.match_info["version"]
        kinds = self._group_versions().get((group, version))
        if kinds is None:
            return web.json_response(_status(404, "NotFound", "the server could not find the requested resource"),
                                     status=404)
        return web.json_response({
            "kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": [{"name": plural, "singularName": kind.lower(), "namespaced": namespaced, "kind": kind,
                           "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
                          for kind, plural, namespaced in kinds]})

    async def _openapi_root(self, _request):
        return web.json_response({"paths": {
            _group_prefix(g, v): {"serverRelativeURL": f"/openapi/v3/{_group_prefix(g, v)}?hash=fake"}
            for g, v in self._group_versions()}})

    async def _openapi_group(self, request):
        """Just enough of a group's OpenAPI v3 document for kubectl to learn that PATCH
        takes ``fieldValidation`` (so it validates on the server, not against a schema)."""
        wanted = request.match_info["path"]
        for (group, version), kinds in self._group_versions().items():
            if _group_prefix(group, version) != wanted:
                continue
            paths = {}
            for kind, plural, namespaced in kinds:
                scope = "namespaces/{namespace}/" if namespaced else ""
                paths[f"/{wanted}/{scope}{plural}/{{name}}"] = {"patch": {
                    "x-kubernetes-group-version-kind": {"group": group, "version": version, "kind": kind},
                    "parameters": [{"name": name, "in": "query", "schema": {"type": "string"}}
                                   for name in ("fieldManager", "fieldValidation", "force", "dryRun")],
                    "responses": {"200": {"description": "OK"}}}}
            return web.json_response({"openapi": "3.0.0", "info": {"title": "fake", "version": version},
                                      "paths": paths})
        return web.json_response(_status(404, "NotFound", wanted), status=404)

    async def _apply(self, request):
        """Server-side apply: the applied object is the desired state (no field ownership
        merging: one manager, ``shoal``); ``metadata.generation`` moves only when what was
        applied differs, so a rollout happens only then."""
        self.patches.append((str(request.rel_url), request.content_type))
        if request.content_type != "application/apply-patch+yaml":
            return web.json_response(_status(415, "UnsupportedMediaType", request.content_type), status=415)
        if request.query.get("fieldManager") != "shoal":
            return web.json_response(_status(422, "Invalid", "fieldManager is required"), status=422)
        parts = request.match_info["path"].split("/")
        namespace = parts[parts.index("namespaces") + 1] if "namespaces" in parts[:-2] else ""
        obj = yaml.safe_load(await request.text())
        kind, name = obj.get("kind"), (obj.get("metadata") or {}).get("name")
        if kind not in APPLIED_KINDS or name != parts[-1]:
            return web.json_response(_status(400, "BadRequest", f"{kind} {name} at {request.path}"), status=400)
        key = (kind, namespace, name)
        current = self.applied.get(key)
        desired = {k: v for k, v in obj.items() if k not in _STATUS_FIELDS}
        desired["metadata"] = {k: v for k, v in obj["metadata"].items()}
        if namespace:
            desired["metadata"]["namespace"] = namespace
        if current is not None and current["desired"] == desired:
            return web.json_response(current["object"])
        self.rv += 1
        metadata = {**desired["metadata"], "resourceVersion": str(self.rv),
                    "uid": current["object"]["metadata"]["uid"] if current else str(uuid.uuid4()),
                    "generation": current["object"]["metadata"]["generation"] + 1 if current else 1}
        stored = {**copy.deepcopy(desired), "metadata": metadata}
        self.applied[key] = {"desired": desired, "object": stored}
        return web.json_response(stored, status=200 if current else 201)

    async def _get_pod(self, request):
        self.requests.append(str(request.rel_url))
        obj = self.objects["Pod"].get((request.match_info["ns"], request.match_info["name"]))
        if obj is None:
            return web.json_response(_status(404, "NotFound", f'pods "{request.match_info["name"]}" '
                                             "not found"), status=404)
        return web.json_response(obj)

    def _review(self, token, wanted):
        """(status) of one token, as the API server's authenticator chain answers it."""
        user = self.tokens.get(token)
        if user is None:
            return {"authenticated": False, "error": "invalid bearer token"}
        bound = self.bound.get(token)
        if bound is None:   # a legacy token: audiences are the API server's own
            if wanted:
                return {"authenticated": False, "error": "token audiences are invalid for "
                        f"the target audiences {wanted}"}
            return {"authenticated": True, "user": user, "audiences": ["https://kubernetes.default.svc"]}
        if time.time() >= bound["expires"]:
            return {"authenticated": False, "error": "[invalid bearer token, square/go-jose/jwt: "
                    "validation failed, token is expired (exp)]"}
        audiences = [a for a in bound["audiences"] if a in wanted] if wanted else \
            [a for a in bound["audiences"] if a == "https://kubernetes.default.svc"]
        if not audiences:
            return {"authenticated": False, "error": f"token audiences {bound['audiences']} are "
                    f"invalid for the target audiences {wanted or ['https://kubernetes.default.svc']}"}
        namespace, pod, uid = bound["pod"]
        current = self.objects["Pod"].get((namespace, pod))
        if current is None:
            return {"authenticated": False, "error": f'[invalid bearer token, pods "{pod}" not found]'}
        if current["metadata"]["uid"] != uid:
            return {"authenticated": False, "error": f"[invalid bearer token, the UID in the bound "
                    f"object reference ({uid}) does not match the UID in record]"}
        return {"authenticated": True, "user": user, "audiences": audiences}

    async def _token_review(self, request):
        body = await request.json()
        spec = body.get("spec") or {}
        self.reviews.append(spec)
        status = self._review(spec.get("token", ""), list(spec.get("audiences") or []))
        return web.json_response({"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                                  "metadata": {}, "spec": spec, "status": status},
                                 status=201)
