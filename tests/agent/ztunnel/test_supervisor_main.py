"""``python -m shoal.agent.ztunnel``: the supervisor (for any N, 1 included), which starts its
workers with its own flags; the supervisor process imports none of the data path.
``--single-process`` runs the proxy itself."""
from __future__ import annotations

import asyncio
import subprocess
import sys

from shoal.agent.ztunnel import __main__ as entry
from shoal.agent.ztunnel import app, supervisor


def _run_inline(main, log_level, **_):
    asyncio.run(main())
    return 0


def test_the_command_line_reaches_the_supervisor_for_its_workers(monkeypatch):
    seen = []

    async def fake_supervisor(config, argv, install_signals=True):
        seen.append((config.workers, list(argv)))

    monkeypatch.setattr(supervisor, "main", fake_supervisor)
    monkeypatch.setattr(entry, "run_daemon", _run_inline)
    flags = ["--node", "node-1", "--workers", "3", "--drain-grace", "7"]
    assert entry.main(flags) == 0
    # One worker is supervised too: the shape every multi-core node runs (README).
    assert entry.main(["--node", "node-1", "--workers", "1"]) == 0
    assert seen == [(3, flags), (1, ["--node", "node-1", "--workers", "1"])]


def test_a_single_process_and_each_worker_run_the_proxy_itself(monkeypatch):
    seen = []

    async def fake_app(config, install_signals=True):
        seen.append((config.workers, config.worker_index, config.single_process))

    monkeypatch.setattr(app, "main", fake_app)
    monkeypatch.setattr(entry, "run_daemon", _run_inline)
    monkeypatch.setattr(entry, "access_log", lambda name: None)   # would detach the logger from caplog
    assert entry.main(["--node", "n", "--single-process", "--workers", "4"]) == 0
    monkeypatch.setenv("SHOAL_PROXY_SINGLE_PROCESS", "1")
    assert entry.main(["--node", "n"]) == 0
    monkeypatch.delenv("SHOAL_PROXY_SINGLE_PROCESS")
    assert entry.main(["--node", "n", "--workers", "2", "--worker", "1:9:10"]) == 0
    assert seen == [(1, -1, True), (1, -1, True), (2, 1, False)]


def test_the_supervisor_imports_no_data_path_module():
    """It owns the node's config stream and certificates (grpc, cryptography), no data path."""
    code = ("import sys, shoal.agent.ztunnel.supervisor, shoal.agent.ztunnel.__main__;"
            "print(sorted(m for m in sys.modules if m.split('.')[-1] in "
            "('app', 'proxy', 'inbound', 'outbound', 'session', 'framing', 'pool', 'h2')));"
            "print('grpc' in sys.modules and 'cryptography' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "True"], out
