"""How every daemon starts and stops (``shoal.runtime``), in a child process as a daemon runs:
the log format on stderr, a fatal error's own exit code, the access log on stdout."""
from __future__ import annotations

import subprocess
import sys
import textwrap

DAEMON = textwrap.dedent("""
    import logging, sys
    from shoal.runtime import access_log, run_daemon

    class LeaseLost(RuntimeError):
        pass

    async def main():
        import asyncio
        logging.getLogger("shoal.test").info("started on %s", type(asyncio.get_running_loop()).__module__)
        access_log("shoal.test.access")('{"bytes": 3}')
        if sys.argv[1] == "fatal":
            raise LeaseLost("lost the Lease")
        if sys.argv[1] == "bug":
            raise KeyError("a bug")
        if sys.argv[1] == "abort":   # what libuv does on an fd closed behind its back
            import os
            os.abort()

    sys.exit(run_daemon(main, "info", fatal={LeaseLost: 7}))
""")


def daemon(how: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", DAEMON, how], capture_output=True, text=True, timeout=60)


def test_a_clean_run_exits_0_with_the_log_on_stderr_and_the_access_log_on_stdout():
    done = daemon("clean")
    assert done.returncode == 0, done.stderr
    assert done.stdout == '{"bytes": 3}\n'                                  # bare, apart from the logs
    assert " INFO shoal.test started on uvloop" in done.stderr              # the log format, uvloop


def test_a_fatal_error_is_logged_and_exits_with_the_daemons_code():
    done = daemon("fatal")
    assert done.returncode == 7
    assert "CRITICAL shoal.runtime lost the Lease" in done.stderr and "Traceback" not in done.stderr


def test_any_other_error_is_not_hidden():
    done = daemon("bug")
    assert done.returncode == 1 and "Traceback" in done.stderr and "KeyError: 'a bug'" in done.stderr


def test_a_crash_below_python_leaves_a_traceback_in_the_log():
    """libuv's abort() once ended a node proxy mid-burst without a line."""
    done = daemon("abort")
    assert done.returncode < 0   # killed by SIGABRT
    assert "Fatal Python error: Aborted" in done.stderr and "in main" in done.stderr, done.stderr
