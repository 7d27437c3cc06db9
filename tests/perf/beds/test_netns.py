"""Root only: the netns bed and both peer pairs carry real mTLS traffic (one short run each)."""
import shutil
import subprocess

import pytest

from shoal.perf import peers, pod2pod
from shoal.perf.beds.netns import NetnsBed
from shoal.perf.harness import RunContext

pytestmark = [pytest.mark.root, pytest.mark.timeout(90)]
TOOLS = ("iperf3", "sockperf", "stunnel4", "haproxy", "ss")


@pytest.fixture
def bed(needs_root):
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")
    made = NetnsBed().up()
    yield made
    made.close()
    leftovers = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert made.tag not in leftovers


def test_peers_carry_request_response(bed, tmp_path):
    ctx = RunContext(quick=True, workdir=tmp_path, bed_kind="netns", _bed_holder={"bed": bed},
                     repetitions=1, _log=lambda m: None)
    client = bed.pod("perf", "client", "node-1")
    server = bed.pod("perf", "server", "node-2")
    assert client.ip.startswith("10.244.1.") and server.ip.startswith("10.244.2.")
    with pytest.raises(ValueError, match="meshed"):
        bed.pod("perf", "meshed", "node-1", meshed=True)
    with pod2pod.servers(ctx, server):
        for base, peer in ((20000, peers.STUNNEL), (21000, peers.HAPROXY)):
            forward = peers.Forward("rr", base + 3, base + 4, pod2pod.RR_PORT)
            with peers.pair(peer, bed, client, server, [forward], tmp_path):
                pct = pod2pod.rr_once(ctx, pod2pod.Route(peer.name, client, "127.0.0.1", rr_port=forward.local))
                assert 0 < pct[50.0] <= pct[99.0]
        # Nothing listens on the peer ports once the pairs are gone.
        out = client.run(["ss", "-Htln"], timeout=5).stdout
        assert ":20003" not in out and ":21003" not in out


def test_a_peer_that_cannot_start_says_why(bed, tmp_path):
    client = bed.pod("perf", "client", "node-1")
    server = bed.pod("perf", "server", "node-2")
    broken = peers.PeerKind("haproxy", peers.haproxy_client_config,
                            lambda certs, ip, forwards: "global\n    no-such-keyword\n",
                            peers.HAPROXY.command, "haproxy")
    forward = peers.Forward("rr", 22003, 22004, pod2pod.RR_PORT)
    with pytest.raises(RuntimeError, match="haproxy server end exited"):
        with peers.pair(broken, bed, client, server, [forward], tmp_path):
            pass
