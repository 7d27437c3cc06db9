"""``python -m shoal.agent.ztunnel``: a supervisor starts its workers with its own flags."""
from __future__ import annotations

import asyncio

from shoal.agent.ztunnel import __main__ as entry


def test_the_command_line_reaches_the_supervisor_for_its_workers(monkeypatch):
    seen = {}

    async def fake_main(config, install_signals=True, argv=()):
        seen.update(workers=config.workers, argv=list(argv))

    def fake_run_daemon(main, log_level, **_):
        asyncio.run(main())
        return 0

    monkeypatch.setattr(entry.app, "main", fake_main)
    monkeypatch.setattr(entry, "run_daemon", fake_run_daemon)
    monkeypatch.setattr(entry, "access_log", lambda name: None)   # would detach the logger from caplog
    flags = ["--node", "node-1", "--workers", "3", "--drain-grace", "7"]
    assert entry.main(flags) == 0
    assert seen == {"workers": 3, "argv": flags}
