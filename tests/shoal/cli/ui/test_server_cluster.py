"""`shoal ui` on the real demo cluster, in headless Chromium: the map shows meshed edges
with mTLS, and a DENY turns the client -> db edge red within 5 s."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from shoal.cli.ui.background import UiServer
from tests.conftest import eventually, shoal_cli
from tests.shoal.cli.observe.test_cli_cluster import DENY_DB
from tests.shoal.cli.ui.browser import chromium_page, require_chromium, screenshot

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

# client-0 talks to db twice a second (the demo client only calls web).
DB_LOOP = """
import socket, time
while True:
    try:
        with socket.create_connection(("db.demo", 7000), timeout=1) as s:
            s.recv(64); s.sendall(b"ping\\n"); s.recv(64)
    except OSError:
        pass
    time.sleep(0.5)
"""
RED = "rgb(211,47,47)"
# demo/client-0 is a bare Pod (its own workload) or a Deployment's pod ("client"): either way.
CLIENT_WEB = "service:demo/web"
CLIENT_DB = "service:demo/db"


def edge(page, target: str):
    """The edge from demo's client workload to ``target``, with its drawn colour."""
    return page.evaluate("""target => { const cy = window.shoalMap;
        const e = cy && cy.edges().filter(x => x.data('target') === target
            && /^workload:demo[/]client(-0)?$/.test(x.data('source')));
        return e && e.nonempty() ? Object.assign({}, e[0].data(), {lineColor: e[0].style('line-color')}) : null; }""",
                         target)


def test_map_shows_mtls_edges_and_a_deny_turns_red(demo_cluster):
    require_chromium()
    layout = demo_cluster.layout
    env = {**os.environ, "SHOAL_CLUSTER": layout.name}
    db_client = subprocess.Popen([sys.executable, "-m", "shoal", "exec", "demo/client-0", "--",
                                  "python3", "-c", DB_LOOP], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        with UiServer(f"unix:{layout.relay_socket}") as server, chromium_page() as page:
            started = time.monotonic()
            page.goto(server.url)
            page.wait_for_function("window.shoalMap !== undefined", timeout=10_000)
            print(f"page ready in {time.monotonic() - started:.2f}s")

            def meshed_edges():
                web, db = edge(page, CLIENT_WEB), edge(page, CLIENT_DB)
                ok = web and db and web["mtls"] == "all" and db["mtls"] == "all" \
                    and web["verdict"] == db["verdict"] == "forwarded"
                return (web, db) if ok else None

            try:
                web, db = eventually(meshed_edges, "client -> web and client -> db with mTLS", timeout=60)
            except AssertionError as failure:
                screenshot(page, "ui-map-timeout.png")
                edges = page.evaluate("window.shoalMap.edges().map(e => e.data())")
                raise AssertionError(f"{failure}; db loop exit code {db_client.poll()}; "
                                     f"the map's edges: {edges}") from None
            assert any("sa/client" in identity and "sa/db" in identity for identity in db["identities"])
            assert web["lineColor"].replace(" ", "") != RED
            screenshot(page, "ui-map-mtls.png")

            shoal_cli(layout, "apply", "-f", "-", input=DENY_DB)
            applied = time.monotonic()
            try:
                def red():
                    found = edge(page, CLIENT_DB)
                    return found if found and found["lineColor"].replace(" ", "") == RED else None

                denied = eventually(red, "the client -> db edge to turn red", timeout=5, interval=0.1)
                print(f"edge red {time.monotonic() - applied:.2f}s after the DENY was applied")
                assert denied["verdict"] == "denied"
                assert edge(page, CLIENT_WEB)["verdict"] == "forwarded"
                row = page.locator(f"#edges tr[data-edge='{denied['id']}']")
                assert "denied" in row.inner_text()
                screenshot(page, "ui-map-denied.png")
            finally:
                shoal_cli(layout, "delete", "-f", "-", input=DENY_DB, check=False)
            assert page.dialogs == [] and page.console_errors == []
    finally:
        os.killpg(db_client.pid, signal.SIGTERM)
        db_client.wait(10)
