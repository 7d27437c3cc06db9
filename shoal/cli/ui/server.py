"""``shoal ui``: a small aiohttp app serving the service map and the live flow table.

Read only by construction: every route is a GET, the app has no handler that changes
anything, and the relay is only ever asked for flows. The page is static (vendored
Cytoscape.js, our app.js): no network at runtime, and a Content-Security-Policy that
allows only scripts from this server, so a name that slipped past escaping still could
not run. Requests whose Host header is not one the UI was told to answer are refused
(DNS rebinding would otherwise let any web page read the cluster's flows).
"""
from __future__ import annotations

import json
import shlex
import time
from importlib import resources

from aiohttp import web

from shoal.api.flow import flow_pb2
from shoal.cli.observe.printers import flow_type, format_time, host_names, summary
from shoal.cli.observe.request import FilterFlags
from shoal.cli.ui.feed import FlowFeed
from shoal.cli.ui.graph import endpoint_node
from shoal.flows.filters import FilterError, FlowMatcher

STATIC_FILES = {
    "app.js": "application/javascript",
    "app.css": "text/css",
    "cytoscape.min.js": "application/javascript",
}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
# What a filter box may hold: Hubble CLI flags, bounded so one request stays cheap.
MAX_FILTER_CHARS = 2048
MAX_FILTER_TERMS = 64
MAX_FLOWS_PER_PAGE = 500
SHORT_FLAGS = {"-n": "namespace", "-l": "label", "-t": "type"}

FEED_KEY = web.AppKey("feed", FlowFeed)
HOSTS_KEY = web.AppKey("hosts", frozenset)


def parse_filter_text(text: str) -> tuple[FilterFlags, FilterFlags]:
    """``--namespace demo --not --verdict FORWARDED`` -> (whitelist flags, blacklist flags).

    The same flags as ``shoal observe`` / ``hubble observe``; raises FilterError."""
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(f"filter longer than {MAX_FILTER_CHARS} characters")
    try:
        words = shlex.split(text)
    except ValueError as error:
        raise FilterError(f"filter: {error}") from None
    allow, deny = FilterFlags(), FilterFlags()
    negate, terms, index = False, 0, 0
    while index < len(words):
        word = words[index]
        index += 1
        if word == "--not":
            negate = True
            continue
        name, eq, value = word.partition("=")
        flag = SHORT_FLAGS.get(name) or (name[2:] if name.startswith("--") else None)
        if not flag:
            raise FilterError(f"filter: expected a flag like --namespace, got {word!r}")
        if not eq:
            if index >= len(words):
                raise FilterError(f"filter: {name} needs a value")
            value = words[index]
            index += 1
        terms += 1
        if terms > MAX_FILTER_TERMS:
            raise FilterError(f"filter: more than {MAX_FILTER_TERMS} terms")
        (deny if negate else allow).add(flag, value)
        negate = False
    if negate:
        raise FilterError("filter: --not must be followed by a filter flag")
    return allow, deny


def flow_row(seq: int, flow: flow_pb2.Flow) -> dict:
    """One flow as the table shows it: plain strings, escaped by the page when rendered."""
    src, dst = host_names(flow)
    source = endpoint_node(flow.source, flow.IP.source, None)
    return {
        "seq": seq,
        "time": format_time(flow.time),
        "time_ns": flow.time.ToNanoseconds(),
        "node": flow.node_name,
        "source": src,
        "destination": dst,
        "source_identity": flow.source.identity,
        "destination_identity": flow.destination.identity,
        "type": flow_type(flow),
        "verdict": flow_pb2.Verdict.Name(flow.verdict),
        "summary": summary(flow),
        "encrypted": flow.IP.encrypted,
        "is_reply": flow.is_reply.value,
        "source_node": source.id,
        "policies": [f"{p.namespace}/{p.name}" for p in (*flow.egress_denied_by, *flow.ingress_denied_by)],
    }


@web.middleware
async def guard(request: web.Request, handler):
    host = (request.host or "").rsplit(":", 1)[0].strip("[]").lower()
    if host not in request.app[HOSTS_KEY]:
        return web.Response(status=421, text=f"host {host!r} not served; start shoal ui with --allow-host")
    response = await handler(request)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Cache-Control"] = "no-store"
    return response


def _static(name: str) -> bytes:
    return resources.files("shoal.cli.ui").joinpath("static", name).read_bytes()


async def index(request: web.Request) -> web.Response:
    return web.Response(body=_static("index.html"), content_type="text/html", charset="utf-8")


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC_FILES:            # a fixed list: no path ever reaches the filesystem
        raise web.HTTPNotFound()
    return web.Response(body=_static(name), content_type=STATIC_FILES[name])


async def graph(request: web.Request) -> web.Response:
    namespace = request.query.get("namespace", "").strip() or None
    feed = request.app[FEED_KEY]
    snapshot = feed.map.snapshot(time.time_ns(), namespace)
    snapshot["relay"] = {"connected": feed.connected, "error": feed.error, "flows_seen": feed.flows_seen}
    snapshot["namespaces"] = sorted({key.namespace for key in feed.map.nodes if key.namespace})
    return web.json_response(snapshot, dumps=_dumps)


async def flows(request: web.Request) -> web.Response:
    feed = request.app[FEED_KEY]
    try:
        after = int(request.query.get("after", "0"))
        limit = min(int(request.query.get("limit", "200")), MAX_FLOWS_PER_PAGE)
        allow, deny = parse_filter_text(request.query.get("filter", ""))
        matcher = FlowMatcher(allow.to_filters(), deny.to_filters())
    except (ValueError, FilterError) as error:
        return web.json_response({"error": str(error)}, status=400)
    rows = [flow_row(seq, flow) for seq, flow in feed.flows_after(after) if matcher(flow)]
    return web.json_response({"flows": rows[-limit:], "last_seq": feed.seq}, dumps=_dumps)


def _dumps(value) -> str:
    # "<" never reaches the page raw, even if a response were ever rendered as HTML.
    return json.dumps(value, separators=(",", ":")).replace("<", "\\u003c")


def build_app(feed: FlowFeed, allowed_hosts: set[str]) -> web.Application:
    app = web.Application(middlewares=[guard], client_max_size=1024)
    app[FEED_KEY] = feed
    app[HOSTS_KEY] = frozenset(h.lower() for h in allowed_hosts)
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/api/graph", graph)
    app.router.add_get("/api/flows", flows)

    async def start_feed(app: web.Application) -> None:
        feed.start()

    async def stop_feed(app: web.Application) -> None:
        await feed.stop()

    app.on_startup.append(start_feed)
    app.on_cleanup.append(stop_feed)
    return app
