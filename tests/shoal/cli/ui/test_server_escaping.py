"""The page renders hostile names as text: nothing from a flow ever runs as script."""
from __future__ import annotations

import time

from shoal.cli.ui.background import UiServer
from shoal.flows.records import l4_flow
from tests.shoal.cli.ui.browser import chromium_page, require_chromium, screenshot

HOSTILE = ["<script>window.__pwned=1;alert(1)</script>", "<img src=x onerror=\"window.__pwned=2\">",
           "\"><svg onload=window.__pwned=3>"]


def hostile_flow(name: str, ts_ns: int):
    flow = l4_flow("10.244.1.2", 40000, "10.244.2.3", 8080, event="open", mtls=True, ts_ns=ts_ns)
    flow.source.namespace = name
    flow.source.pod_name = name
    flow.source.workloads.add(name=name, kind="Deployment")
    flow.destination.namespace = "demo"
    flow.destination.pod_name = name
    flow.destination.labels.append(f"k8s:app={name}")
    flow.node_name = name
    return flow


def test_pod_named_script_does_not_run(tmp_path):
    require_chromium()
    with UiServer(f"unix:{tmp_path}/no-relay.sock") as server:
        now = time.time_ns()
        for index, name in enumerate(HOSTILE):
            server.call(server.feed.add, hostile_flow(name, now + index))
        with chromium_page() as page:
            page.goto(server.url)
            page.wait_for_function("document.querySelectorAll('#flows tbody tr').length >= 3", timeout=10_000)
            page.wait_for_function("window.shoalMap && window.shoalMap.edges().length >= 1", timeout=10_000)
            text = page.inner_text("#flows")
            for name in HOSTILE:
                assert name in text                       # shown literally
            assert page.evaluate("window.__pwned") is None
            assert page.dialogs == []
            assert page.locator("#flows script, #flows img, #flows svg, #edges script, #edges img").count() == 0
            labels = page.evaluate("window.shoalMap.nodes().map(n => n.data('label'))")
            assert any("<script>" in label for label in labels)   # drawn on the canvas as text
            namespaces = page.evaluate("Array.from(document.querySelectorAll('#namespace option'))"
                                       ".map(o => o.textContent)")
            assert HOSTILE[0] in namespaces
            screenshot(page, "ui-escaping.png")
