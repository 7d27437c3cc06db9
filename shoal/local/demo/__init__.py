"""The demo: namespaces `demo` (meshed) and `legacy`, and a way to show their traffic."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

DEMO_MANIFEST = Path(__file__).with_name("demo.yaml")


def demo_objects() -> list[dict]:
    return [d for d in yaml.safe_load_all(DEMO_MANIFEST.read_text()) if d]


def deploy_demo(cluster, echo: Callable[[str], None] = print, settle: float = 30.0) -> None:
    """Applies the demo, waits for its pods, and shows a few real requests."""
    echo("Deploying the demo (namespaces demo and legacy)")
    cluster.api.apply(demo_objects())
    pods = cluster.wait_pods_running()
    for pod in pods:
        meta, spec, status = pod["metadata"], pod["spec"], pod["status"]
        echo(f"  {meta['namespace']}/{meta['name']:<10} {spec['nodeName']:<8} {status.get('podIP', '')}")
    show_traffic(cluster, echo, settle)


def show_traffic(cluster, echo: Callable[[str], None], settle: float) -> None:
    from shoal.local.sandbox import SandboxError, exec_argv
    layout = cluster.layout
    for namespace in ("demo", "legacy"):
        deadline = time.monotonic() + settle
        answer = ""
        while time.monotonic() < deadline:
            try:
                argv = exec_argv(layout, namespace, "client-0",
                                 ["curl", "-s", "--max-time", "3", "http://web.demo:8080/"])
            except SandboxError:   # its process is still setting up its sandbox
                time.sleep(0.2)
                continue
            result = subprocess.run(argv, capture_output=True, text=True)
            answer = result.stdout.strip()
            if result.returncode == 0 and answer:
                break
            time.sleep(0.5)
        echo(f"  {namespace}/client-0 -> web.demo:8080: {answer or 'no answer'}")
    show_flows(layout, echo)


def show_flows(layout, echo: Callable[[str], None]) -> None:
    """The last few flows of the demo namespace, as `shoal observe` prints them."""
    argv = [sys.executable, "-m", "shoal", "--cluster", layout.name,
            "observe", "--namespace", "demo", "--to-port", "8080", "--last", "6"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        echo(f"  (no flows to show: {result.stderr.strip()})")
        return
    echo("Flows (shoal observe --namespace demo --to-port 8080 --last 6):")
    for line in result.stdout.splitlines():
        echo(f"  {line}")
