"""Wires the controller: store, local API, and (local mode) the embedded kubelet."""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from shoal.controller.config import ControllerConfig
from shoal.controller.localapi import build_app, serve_unix
from shoal.controller.store import Store
from shoal.local.kubelet import LocalKubelet

log = logging.getLogger(__name__)


class ControllerApp:
    def __init__(self, config: ControllerConfig):
        self.config = config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(config.layout.store_path, service_cidr=config.layout.SERVICE_CIDR)
        self.kubelet = LocalKubelet(config.layout, self.store) if config.run_kubelet else None

    def controller_status(self) -> dict[str, Any]:
        return {"resourceVersion": str(self.store.resource_version), "agents": []}

    async def run(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        runner = await serve_unix(build_app(self.store, self.controller_status), self.config.layout.api_socket)
        tasks = [asyncio.create_task(self.kubelet.run())] if self.kubelet else []
        log.info("controller ready: API on %s", self.config.layout.api_socket)
        await stop.wait()
        for task in tasks:
            task.cancel()
        await runner.cleanup()
        self.store.close()
