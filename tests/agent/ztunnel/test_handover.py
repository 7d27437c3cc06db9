"""Every way a proxy process goes leaves a line (issue 18: a node proxy died mid-burst and
its log just stopped): a background task that fails is logged at once with its
traceback, a stop is not stopped by it, a signal says it is the reason."""
from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap

from shoal.agent.ztunnel.handover import cancel_all, reported


async def test_a_background_task_that_fails_is_logged_at_once_with_its_traceback(caplog):
    async def feed_reader() -> None:
        await asyncio.sleep(0)
        raise OSError(24, "Too many open files")   # e.g. a memfd for a new SVID's key

    async def forever() -> None:
        await asyncio.Event().wait()

    tasks = [reported(asyncio.ensure_future(feed_reader()), "feed reader"),
             reported(asyncio.ensure_future(forever()), "readiness")]
    with caplog.at_level(logging.ERROR, logger="shoal.agent.ztunnel.handover"):
        await asyncio.sleep(0.05)
        # Logged while the task is still referenced: asyncio's "never retrieved" would wait for its end.
        [line] = caplog.records
        assert line.getMessage() == "feed reader stopped: OSError: [Errno 24] Too many open files"
        assert line.exc_info is not None
        await cancel_all(tasks)   # the failed one does not stop the stop
    assert tasks == [] and len(caplog.records) == 1   # a cancelled task is no failure


SIGNALLED = textwrap.dedent("""
    import asyncio, logging, os, signal, sys
    from shoal.agent.ztunnel.handover import serve_until_signalled

    class Proxy:
        async def start(self):   # the signal comes once the handlers are in place
            asyncio.get_running_loop().call_later(0.1, os.kill, os.getpid(), signal.SIGTERM)
        async def retire(self):
            logging.getLogger("test").info("retired")

    logging.basicConfig(level="INFO", stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    asyncio.run(serve_until_signalled(Proxy()))
""")


def test_a_signal_says_it_is_why_the_process_goes():
    done = subprocess.run([sys.executable, "-c", SIGNALLED], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "INFO shoal.agent.ztunnel.handover SIGTERM (pid " in done.stderr and "): retiring" in done.stderr
    assert "retired" in done.stderr
