"""The UI's one follow stream on the relay: feeds the service map and the recent-flows ring.

One stream serves every browser tab (a page polls the UI server, never the relay), so N
open pages cost the relay one client. The stream reconnects with backoff and resumes
from the newest flow it saw, so a relay restart shows as a gap, not as duplicates.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Iterator

import grpc

from shoal.api.flow import flow_pb2
from shoal.api.observer import observer_pb2, observer_pb2_grpc
from shoal.cli.ui.graph import ServiceMap

log = logging.getLogger(__name__)


class FlowFeed:
    def __init__(self, channel_factory, *, recent: int = 5000, window_s: float = 10.0,
                 backlog_s: float = 30.0, retry_max_s: float = 5.0) -> None:
        """``channel_factory()`` returns a new ``grpc.aio.Channel`` to the relay."""
        self._channel_factory = channel_factory
        self.map = ServiceMap(window_s=window_s)
        self.recent: collections.deque[tuple[int, flow_pb2.Flow]] = collections.deque(maxlen=recent)
        self.seq = 0
        self.backlog_ns = int(backlog_s * 1e9)
        self.retry_max_s = retry_max_s
        self.connected = False
        self.error = ""
        self.flows_seen = 0
        self._task: asyncio.Task | None = None
        self._newest_ns = 0

    def add(self, flow: flow_pb2.Flow) -> None:
        self.seq += 1
        self.flows_seen += 1
        self.recent.append((self.seq, flow))
        self.map.add(flow)
        self._newest_ns = max(self._newest_ns, flow.time.ToNanoseconds())

    def flows_after(self, seq: int) -> Iterator[tuple[int, flow_pb2.Flow]]:
        """Stored flows with a sequence number above ``seq``, oldest first."""
        for entry in self.recent:
            if entry[0] > seq:
                yield entry

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        delay = 0.5
        while True:
            channel = self._channel_factory()
            try:
                request = observer_pb2.GetFlowsRequest(follow=True)
                since = self._newest_ns + 1 if self._newest_ns else time.time_ns() - self.backlog_ns
                request.since.FromNanoseconds(since)
                call = observer_pb2_grpc.ObserverStub(channel).GetFlows(request)
                async for response in call:
                    if not self.connected:
                        self.connected, self.error, delay = True, "", 0.5
                    if response.HasField("flow"):
                        self.add(response.flow)
                self.error = "relay ended the stream"
            except grpc.aio.AioRpcError as error:
                self.error = f"relay: {error.code().name}: {error.details()}"
                log.info("flow feed: %s", self.error)
            finally:
                self.connected = False
                await channel.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.retry_max_s)
