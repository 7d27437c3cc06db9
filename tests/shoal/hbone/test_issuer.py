"""Certificate fetch while the controller is down (issue 18): retried with backoff,
logged and counted, never an unhandled ``AioRpcError`` ("Task exception was never
retrieved"); a refusal stays final. The node proxy's real gRPC client against a dead
address is in tests/agent/ztunnel/test_app.py."""
from __future__ import annotations

import asyncio
import gc
import time

import pytest

from shoal.hbone.identity import IdentityError, SignerUnavailable
from shoal.hbone.issuer import IdentityManager
from tests.devca import DevCA

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def ca():
    return DevCA()


class FlakyCA:
    """Unreachable for the first ``down`` requests, then the real test CA."""

    def __init__(self, ca, down: int):
        self.ca, self.down, self.calls = ca, down, 0

    async def sign(self, csr_pem: bytes):
        self.calls += 1
        if self.calls <= self.down:
            raise SignerUnavailable("controller CA: UNAVAILABLE: connection refused")
        return await self.ca.sign(csr_pem)


def never_retrieved(caplog) -> list:
    gc.collect()
    return [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def test_unreachable_ca_is_retried_with_backoff_and_the_pod_goes_on(ca, caplog):
    flaky, errors = FlakyCA(ca, down=4), []
    identities = IdentityManager(flaky.sign, on_error=errors.append, wait=0.3)
    spiffe = await identities.acquire("demo", "web")   # does not raise: enrolment goes on
    assert spiffe == "spiffe://cluster.local/ns/demo/sa/web" and identities.current(spiffe) is None
    svid = await asyncio.wait_for(_eventually_issued(identities, spiffe), 10)
    assert svid.spiffe_id == spiffe and flaky.calls == 5 and len(errors) == 4  # counted each time
    assert sum("retrying in" in r.getMessage() for r in caplog.records) == 4    # and logged
    assert never_retrieved(caplog) == []


async def _eventually_issued(identities, spiffe):
    while identities.current(spiffe) is None:
        await asyncio.sleep(0.05)
    return identities.current(spiffe)


async def test_refusal_is_final_and_released(ca, caplog):
    async def refuse(csr_pem):
        raise IdentityError("controller CA: PERMISSION_DENIED: node-1 does not host demo/db")

    identities = IdentityManager(refuse, wait=0.3)
    with pytest.raises(IdentityError, match="PERMISSION_DENIED"):
        await identities.acquire("demo", "db")
    assert identities._users == {} and identities._inflight == {}
    assert never_retrieved(caplog) == []


async def test_release_stops_the_retries_and_fails_who_still_waits(ca):
    flaky = FlakyCA(ca, down=10**6)
    identities = IdentityManager(flaky.sign, wait=0.1)
    spiffe = await identities.acquire("demo", "web")
    identities.wait = 5.0
    waiter = asyncio.ensure_future(identities.get(spiffe))  # e.g. a dial from that pod
    await asyncio.sleep(0.05)
    identities.release("demo", "web")
    with pytest.raises(IdentityError, match="no longer served"):  # refused, not left cancelled
        await asyncio.wait_for(waiter, 2)
    calls = flaky.calls
    await asyncio.sleep(0.6)
    assert flaky.calls == calls  # nobody needs it: no more requests to the CA


async def test_every_issue_and_rotation_is_announced_and_the_last_release_drops(ca):
    """What a node proxy's supervisor forwards to its workers (agent/ztunnel/feed.py):
    each SVID as it is signed or rotated, and the identity once its last pod left."""
    now = [0.0]
    issued, dropped = [], []
    identities = IdentityManager(ca.sign, clock=lambda: now[0] or time.time(),
                                 on_issued=issued.append, on_dropped=dropped.append)
    spiffe = await identities.acquire("demo", "web")
    await identities.acquire("demo", "web")          # a second pod of it: no new CSR
    assert [s.spiffe_id for s in issued] == [spiffe] and issued[0].key_pem.startswith(b"-----BEGIN PRIVATE KEY")
    now[0] = issued[0].refresh_at() + 1              # past half-life
    assert await identities.rotate_due() == 1
    assert len(issued) == 2 and issued[1] is identities.current(spiffe) and issued[1].key_pem != issued[0].key_pem
    identities.release("demo", "web")
    assert dropped == [] and identities.in_use() == [spiffe]   # one pod of it is left
    identities.release("demo", "web")
    assert dropped == [spiffe] and identities.current(spiffe) is None
