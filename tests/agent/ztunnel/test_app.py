"""The node proxy's wiring (``ProxyApp``): its certificate client against a controller that
is down retries (UNAVAILABLE) and never leaves an unretrieved task exception; a worker
imports none of the heavy packages only other daemons need (its idle RSS)."""
from __future__ import annotations

import logging
import socket

import pytest

from shoal.agent.ztunnel.app import ProxyApp
from shoal.agent.ztunnel.config import ProxyConfig
from shoal.config import ClusterLayout
from shoal.hbone.identity import IdentityError
from tests.shoal.hbone.test_issuer import never_retrieved

pytestmark = pytest.mark.timeout(30)


async def test_real_controller_client_down_is_a_retried_unavailable(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    config = ProxyConfig(node="node-1", layout=ClusterLayout(name="shoal-test", run_root=tmp_path), controller=dead)
    app = ProxyApp(config, serve_http=False)
    app.ctx.identities.wait = 1.0
    try:
        spiffe = await app.ctx.identities.acquire("demo", "web")
        assert app.ctx.identities.current(spiffe) is None
        retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
        assert retries and "UNAVAILABLE" in retries[0]
        assert never_retrieved(caplog) == []
        with pytest.raises(IdentityError):  # a caller that needs it now gets a clear error
            await app.ctx.identities.get(spiffe)
    finally:
        app.ctx.identities.release("demo", "web")
        await app.stop()


# Heavy packages the node proxy's workers never need (RSS each adds to a worker, measured
# on top of the worker's own imports): grpc (~14 MB) and cryptography (~10 MB), which
# only the node's link to the controller needs (its supervisor's, nodelink.py), the Kubernetes client (~40 MB), pyroute2 (~10 MB,
# the agent's), aiohttp (~8 MB, the CLI's and the controller's), the waypoint's HTTP parser,
# and every other daemon and user tool. The worker's budget is 60 MB idle (issue 13).
WORKER_MUST_NOT_IMPORT = ("grpc", "cryptography", "shoal.xds.client", "shoal.hbone.issuer", "shoal.agent.ztunnel.nodelink",
                          "kubernetes_asyncio", "pyroute2", "aiohttp", "yaml", "click", "httptools", "re2", "bcc",
                          "shoal.local", "shoal.cli", "shoal.controller", "shoal.waypoint", "shoal.agent.hubble",
                          "shoal.agent.app", "shoal.agent.loader", "shoal.agent.k8s")


# The supervisor and the node's link to the controller (the supervisor's, or a single
# process's): never a worker's.
CONTROLLER_LINK = ("shoal.agent.ztunnel.supervisor", "shoal.agent.ztunnel.nodelink", "shoal.hbone.issuer")


def _modules_the_worker_imports() -> list[str]:
    """Every module named by an import statement, at any depth (lazy imports in functions
    included), in the worker's own code: the node proxy and the HBONE library, but the
    link to the controller (only the entry point's supervisor branch and the single process's wiring import it, lazily)."""
    import ast
    from pathlib import Path

    import shoal.agent.ztunnel
    import shoal.hbone

    names = {"shoal.agent.ztunnel.__main__", "shoal.agent.ztunnel.app"}
    for package in (shoal.agent.ztunnel, shoal.hbone):
        prefix = package.__name__
        for path in Path(package.__path__[0]).glob("*.py"):
            module = f"{prefix}.{path.stem}" if path.stem != "__init__" else prefix
            if module in CONTROLLER_LINK:
                continue
            names.add(module)
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names.add(node.module)
                elif isinstance(node, ast.Import):
                    names.update(alias.name for alias in node.names)
    return sorted(names - set(CONTROLLER_LINK))


def test_the_worker_imports_none_of_the_heavy_packages_it_does_not_need():
    import subprocess
    import sys

    modules = _modules_the_worker_imports()
    assert "shoal.flows.emitter" in modules, "lazy imports are found"
    assert "shoal.agent.ztunnel.feed" in modules and "shoal.hbone.identity" in modules
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            f"bad = {WORKER_MUST_NOT_IMPORT!r}\n"
            "print(sorted(m for m in sys.modules if any(m == b or m.startswith(b + '.') for b in bad)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"the node proxy's worker imports {out.strip()}"
