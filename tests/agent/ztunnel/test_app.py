"""The node proxy's wiring (``ProxyApp``): its certificate client against a controller that
is down retries (UNAVAILABLE) and never leaves an unretrieved task exception."""
from __future__ import annotations

import logging
import socket

import pytest

from shoal.agent.ztunnel.app import ProxyApp
from shoal.agent.ztunnel.config import ProxyConfig
from shoal.config import ClusterLayout
from shoal.hbone.identity import IdentityError
from tests.shoal.hbone.test_identity import never_retrieved

pytestmark = pytest.mark.timeout(30)


async def test_real_controller_client_down_is_a_retried_unavailable(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    config = ProxyConfig(node="node-1", layout=ClusterLayout(name="shoal-test", run_root=tmp_path), controller=dead)
    app = ProxyApp(config, serve_http=False)
    app.ctx.identities.wait = 1.0
    try:
        spiffe = await app.ctx.identities.acquire("demo", "web")
        assert app.ctx.identities.current(spiffe) is None
        retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
        assert retries and "UNAVAILABLE" in retries[0]
        assert never_retrieved(caplog) == []
        with pytest.raises(IdentityError):  # a caller that needs it now gets a clear error
            await app.ctx.identities.get(spiffe)
    finally:
        app.ctx.identities.release("demo", "web")
        await app.stop()
