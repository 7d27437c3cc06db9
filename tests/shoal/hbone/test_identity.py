"""``HeldIdentities``, a supervised worker's SVIDs: only what its supervisor handed over,
waited for while announced as pending, refused when never announced, gone when dropped."""
from __future__ import annotations

import asyncio
import ssl
import types

import pytest

from shoal.hbone.identity import DirectSSLObject, HeldIdentities, IdentityError
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


async def test_tls_objects_call_the_native_methods_and_behave_as_ssl_objects(ca):
    """The contexts' TLS objects (memory BIOs, as uvloop's TLS transport makes them) read,
    write and report pending bytes through the C methods directly, with ssl's results
    and exceptions: a handshake, bytes both ways, a read with nothing in, the peer's cert."""
    svid = await signed(ca)
    bios = [ssl.MemoryBIO() for _ in range(4)]   # client in/out, server in/out
    client = svid.client_context.wrap_bio(bios[0], bios[1])
    server = svid.server_context.wrap_bio(bios[2], bios[3], server_side=True)
    for tls in (client, server):
        assert isinstance(tls, DirectSSLObject)
        assert all(isinstance(getattr(tls, name), types.BuiltinMethodType) for name in ("read", "write", "pending"))

    def shuttle() -> None:
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())

    for _ in range(4):
        for tls in (client, server):
            try:
                tls.do_handshake()
            except ssl.SSLWantReadError:
                pass
        shuttle()
    assert client.selected_alpn_protocol() == server.selected_alpn_protocol() == "h2"
    assert client.getpeercert() and server.getpeercert()
    assert client.write(b"ping" * 300) == 1200
    shuttle()
    buffer = bytearray(4096)
    assert server.read(4096, buffer) == 1200 and bytes(buffer[:1200]) == b"ping" * 300
    assert server.pending() == 0
    with pytest.raises(ssl.SSLWantReadError):
        server.read(4096, buffer)
    server.write(b"pong")
    shuttle()
    assert client.read(4096) == b"pong"
