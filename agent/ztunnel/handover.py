"""The restart handover's markers, shared by the single-process proxy and the supervisor.

A new node proxy takes over the ZDS path, writes ``<node dir>/proxy.pid`` and SIGTERMs
the instance named there; once it serves every pod it writes ``proxy.ready``, which is
what the retiring one waits for before it stops accepting (app.py's docstring has the
whole sequence). Markers name an instance (``<pid>-<random>``), not just a pid: two
instances may share a pid in tests.

Both also keep ``<node dir>/proxy-workers.json`` (each worker's pid, connections and
health, for ``shoal status``): a single process is its own one worker.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError as exc:
        return exc.errno == errno.EPERM


def marker_pid(marker: str) -> int:
    head = marker.split("-", 1)[0]
    return int(head) if head.isdigit() else 0


class Markers:
    """``proxy.pid`` / ``proxy.ready`` in the node directory, written atomically."""

    def __init__(self, node_dir: str):
        self.node_dir = Path(node_dir)
        self.instance = f"{os.getpid()}-{os.urandom(4).hex()}"

    def write(self, name: str) -> None:
        path = self.node_dir / name
        tmp = path.with_name(f".{name}.{self.instance}")
        tmp.write_text(f"{self.instance}\n")
        os.replace(tmp, path)

    def read(self, name: str) -> str:
        try:
            return (self.node_dir / name).read_text().strip()
        except FileNotFoundError:
            return ""

    def remove_own(self) -> None:
        """Remove the markers that still name us (a successor may have replaced them)."""
        for name in ("proxy.pid", "proxy.ready"):
            if self.read(name) == self.instance:
                with contextlib.suppress(FileNotFoundError):
                    (self.node_dir / name).unlink()

    def retire_predecessor(self, predecessor: str) -> None:
        """SIGTERM the proxy that held ``proxy.pid`` before us (read before we wrote ours)."""
        old_pid = marker_pid(predecessor)
        if old_pid and old_pid != os.getpid() and pid_alive(old_pid):
            log.info("handover: asking proxy %d to retire", old_pid)
            os.kill(old_pid, signal.SIGTERM)

    async def wait_for_successor(self, timeout: float) -> bool:
        """Until another live instance wrote ``proxy.ready`` (it serves every pod), or ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = self.read("proxy.ready")
            if ready and ready != self.instance and pid_alive(marker_pid(ready)):
                return True
            await asyncio.sleep(0.05)
        log.warning("handover: no ready successor after %.0fs, stopping anyway", timeout)
        return False


def reported(task: asyncio.Task, name: str) -> asyncio.Task:
    """``task``, a proxy's long-lived background task, logged with its traceback the
    moment it ends with an exception: kept in a list, it is never freed, so asyncio's
    "Task exception was never retrieved" would never be written (a feed reader or a
    restart loop that died would go unseen)."""
    def ended(done: asyncio.Task) -> None:
        if not done.cancelled() and (exc := done.exception()) is not None:
            log.error("%s stopped: %s: %s", name, type(exc).__name__, exc, exc_info=exc)
    task.add_done_callback(ended)
    return task


async def cancel_all(tasks: list[asyncio.Task]) -> None:
    """Cancel a stopping proxy's background tasks and wait until each has ended (one
    that failed earlier was logged then: the stop goes on)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    tasks.clear()


class Retiring(Protocol):
    """A node proxy as a process runs it: the single process, a worker or the supervisor."""

    async def start(self) -> None: ...
    async def retire(self) -> None: ...


async def serve_until_signalled(proxy: Retiring, install_signals: bool = True) -> None:
    """Start ``proxy``; SIGTERM or SIGINT retires it (handover or stop); return when it has."""
    await proxy.start()
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        # A worker whose supervisor died gets SIGTERM too (PR_SET_PDEATHSIG): either way
        # the log says why this process is going.
        log.info("%s (pid %d): retiring", signal.Signals(signum).name, os.getpid())
        task = reported(asyncio.ensure_future(proxy.retire()), "retiring")
        task.add_done_callback(lambda _: done.set())

    if install_signals:
        loop.add_signal_handler(signal.SIGTERM, on_signal, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGINT, on_signal, signal.SIGINT)
    await done.wait()


def worker_entry(index: int, pid: int, health: str, status: dict, uptime: float) -> dict:
    """One worker in ``/workers`` and ``proxy-workers.json``, from its ``/worker`` page."""
    return {"index": index, "pid": pid, "health": health,
            "connections": status.get("connections", 0), "handled": status.get("handled", 0),
            "hbone_connections": status.get("hbone_connections", 0), "pods": status.get("pods", []),
            "rss_kib": status.get("rss_kib", 0),
            "uptime_seconds": round(uptime, 1)}


def write_workers_report(path: str, report: dict) -> None:
    """``proxy-workers.json``, replaced atomically (``shoal status`` reads it)."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_text(json.dumps(report))
    os.replace(tmp, target)


def remove_workers_report(path: str) -> None:
    """Remove ``proxy-workers.json`` if this process wrote it (a successor may have replaced it)."""
    with contextlib.suppress(FileNotFoundError, ValueError):
        if json.loads(Path(path).read_text()).get("proxy") == os.getpid():
            os.unlink(path)
