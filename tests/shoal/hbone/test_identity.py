"""``HeldIdentities``, a supervised worker's SVIDs: only what its supervisor handed over,
waited for while announced as pending, refused when never announced, gone when dropped."""
from __future__ import annotations

import asyncio

import pytest

from shoal.hbone.identity import HeldIdentities, IdentityError
from shoal.hbone.issuer import make_csr, svid_from_signed
from tests.devca import DevCA

pytestmark = pytest.mark.timeout(30)
WEB = "spiffe://cluster.local/ns/demo/sa/web"


@pytest.fixture(scope="module")
def ca():
    return DevCA()


async def signed(ca, spiffe: str = WEB):
    key_pem, csr_pem = make_csr(spiffe)
    chain_pem, roots_pem = await ca.sign(csr_pem)
    return svid_from_signed(spiffe, chain_pem, key_pem, roots_pem)


async def test_an_identity_never_handed_over_is_refused():
    held = HeldIdentities(wait=0.2)
    with pytest.raises(IdentityError, match="holds no such identity"):
        await held.acquire("demo", "db")
    with pytest.raises(IdentityError, match="not an identity of this node"):
        await held.get("spiffe://cluster.local/ns/demo/sa/db")


async def test_enrolment_waits_for_the_announcement_and_a_dial_for_the_svid(ca):
    held = HeldIdentities(wait=5)
    enrolling = asyncio.ensure_future(held.acquire("demo", "web"))
    await asyncio.sleep(0.05)
    assert not enrolling.done()
    held.pending(WEB)                     # the CA is being retried: the pod goes on
    assert await asyncio.wait_for(enrolling, 1) == WEB and held.current(WEB) is None
    dial = asyncio.ensure_future(held.get(WEB))
    await asyncio.sleep(0.05)
    assert not dial.done()
    svid = await signed(ca)
    held.grant(svid)
    assert await asyncio.wait_for(dial, 1) is svid and held.rotations == 0
    held.grant(await signed(ca))          # rotation
    assert held.rotations == 1 and held.current(WEB) is not svid
    assert [c["identity"] for c in held.describe()] == [WEB]
    held.drop(WEB)                        # the node's last pod of it left
    assert held.current(WEB) is None and held.describe() == []
    with pytest.raises(IdentityError):
        await held.get(WEB)


async def test_a_pending_svid_not_handed_over_in_time_is_a_clear_error():
    held = HeldIdentities(wait=0.2)
    held.pending(WEB)
    with pytest.raises(IdentityError, match="not handed over by the supervisor"):
        await held.get(WEB)
