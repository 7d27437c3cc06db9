"""``shoal ui``: serves the service map and flow table on a local port."""
from __future__ import annotations

import asyncio
import logging

import click

from shoal.cli.observe.client import connection, tls_options
from shoal.config import ClusterLayout

DEFAULT_ADDRESS = "127.0.0.1:8089"


@click.command("ui", help="Serve the web UI (service map, live flows) from the flow relay. "
                          "Read only; binds to loopback by default. On Kubernetes: "
                          "`kubectl -n shoal-system port-forward svc/shoal-controller 4245` "
                          "and `shoal ui --server localhost:4245` with the --tls-* flags "
                          "(the relay takes only mTLS; see docs/kubernetes.md).")
@click.option("--address", default=DEFAULT_ADDRESS, show_default=True, help="host:port to serve on.")
@click.option("--server", help="Relay address: host:port or unix:/path (default: this cluster's relay socket).")
@click.option("--allow-host", multiple=True,
              help="Extra Host header values to answer (the UI refuses others: DNS rebinding).")
@tls_options
@click.pass_context
def ui(ctx: click.Context, address: str, server: str | None, allow_host: tuple[str, ...], **tls) -> None:
    from aiohttp import web

    from shoal.cli.ui.feed import FlowFeed
    from shoal.cli.ui.server import build_app

    layout = ctx.find_object(ClusterLayout) or ClusterLayout.from_env()
    relay = connection(layout, server, **tls)
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    hosts = {"localhost", "127.0.0.1", "::1", host, *allow_host}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def serve() -> None:
        feed = FlowFeed(lambda: relay.channel(aio=True))
        runner = web.AppRunner(build_app(feed, hosts), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, int(port)).start()
        click.echo(f"shoal ui: http://{address}/ (flows from {relay.address}); Ctrl-C to stop", err=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
