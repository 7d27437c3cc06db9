"""Issue 18's HTTP/2 floods against a node proxy's 15008, and what another client feels.

A victim (meshed pod on node-1) opens connections at a steady rate to an echo app in a
meshed pod on node-2 (through both node proxies, HBONE); each is a connect and one echoed
line. First alone (the baseline, measured in this run), then during each flood: an
attacker in an unmeshed pod on node-1 holding a certificate of the cluster's CA (what
any meshed pod has) floods node-2's 15008 for the server pod with Rapid Reset
(CONNECT + RST_STREAM pairs), PING, SETTINGS or CONTINUATION frames, reconnecting each
time the proxy cuts it off (one attacker pod per flood: the proxy holds a cut-off source
in its penalty box for a while, which would otherwise carry over to the next flood).
The ``handshake`` flood needs no certificate: the attacker holds thousands of connections
that start a ClientHello and never finish it, and sends garbage ClientHellos and complete
handshakes with a certificate the mesh CA never issued, all at once
(``HANDSHAKE_FLOOD_CLIENT``; the proxy's side is shoal/hbone/handshakes.py).

Figures per phase (path = baseline or the flood's name): the victim's failures and p99
(ms), and the node-2 proxy's peak RSS. Targets: 0 failures and p99 <= 2x the baseline.
The scaled-down versions run in ``make test`` (tests/agent/ztunnel/test_proxy_load.py).
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shoal.perf import procstat
from shoal.perf.connscripts import ECHO_APP, H2_FLOOD_CLIENT, HANDSHAKE_FLOOD_CLIENT, SOAK_CLIENT, summary_of
from shoal.perf.scenario import Context, Measurement, Scenario, Target

NAMESPACE, ATTACKER_NAMESPACE = "perf-flood", "perf-flood-attacker"
PORT, HBONE_PORT = 9200, 15008
VICTIM_RATE = 20
FLOODS = ("rapid_reset", "ping", "settings", "continuation", "handshake")
BENCH = f"hbone.flood_victim[rate={VICTIM_RATE}/s]"
ATTACKER_ID = f"spiffe://cluster.local/ns/{ATTACKER_NAMESPACE}/sa/attacker"


def attacker_credentials(ctx: Context) -> tuple[str, str, str]:
    """(chain PEM, key PEM, roots PEM) for the attacker's identity, signed by the bench
    cluster's own CA: a certificate like the one every meshed pod holds."""
    from shoal.controller.ca import CertificateAuthority

    ca = CertificateAuthority.load_or_create(ctx.bed.layout.ca_dir, "cluster.local")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ATTACKER_ID)]), critical=True)
           .sign(key, hashes.SHA256()))
    signed = ca.sign(csr.public_bytes(serialization.Encoding.PEM), ATTACKER_ID)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return signed.chain_pem, key_pem, signed.roots_pem


def untrusted_credentials() -> tuple[str, str]:
    """(certificate PEM, key PEM): the attacker's SPIFFE ID, self-signed, so no mesh CA
    vouches for it; the proxy must refuse it in the handshake."""
    import datetime

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ATTACKER_ID)]), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem


def flood_command(ctx: Context, phase: str, target: str, seconds: float, credentials: tuple[str, ...],
                  untrusted: tuple[str, str]) -> list[str]:
    """The attacker's command line for ``phase``: HTTP/2 frames over a trusted certificate,
    or (``handshake``) thousands of handshakes that never finish or fail."""
    if phase == "handshake":
        idle = int(ctx.seconds(2000, 500))
        return [sys.executable, "-c", HANDSHAKE_FLOOD_CLIENT, target, str(HBONE_PORT), str(seconds + 2),
                str(idle), "4", *untrusted]
    return [sys.executable, "-c", H2_FLOOD_CLIENT, target, str(HBONE_PORT), f"{target}:{PORT}", phase,
            str(seconds + 2), *credentials]


def attacker_note(attack: dict) -> str:
    """What the attacker did and met, from its summary."""
    if "idle_opened" in attack:
        return (f"attacker: {attack['idle_opened']} never-finished handshakes opened (at most "
                f"{attack['idle_peak']} at once, held {attack['idle_held_s']} s in all), {attack['garbage']} "
                f"garbage ClientHellos, {attack['untrusted']} untrusted certificates "
                f"({attack['untrusted_accepted']} answered), {attack['reset']} reset by the proxy, "
                f"errors {attack['errors']} (ConnectionResetError: refused at accept, per-source cap or penalty box)")
    return (f"attacker: {attack['frames']} frames over {attack['connections']} connections, "
            f"GOAWAY codes {attack['goaway']} (11 = ENHANCE_YOUR_CALM), "
            f"{attack['stalled']} stalled (the proxy stopped reading), errors {attack['errors']} "
            "(ConnectionResetError: refused at accept, a source cut off for abuse)")


def run(ctx: Context) -> Iterator[Measurement]:
    client = ctx.bed.pod(NAMESPACE, "victim", "node-1", meshed=True, service_account="victim")
    server = ctx.bed.pod(NAMESPACE, "server", "node-2", meshed=True, service_account="server")
    # One attacker pod per flood: node-2's proxy refuses a source it cut off for abuse for a
    # while (shoal/hbone/penalty.py), so a flood from the previous flood's address would
    # meet that refusal instead of the proxy's handling of this flood.
    attackers = {flood: ctx.bed.pod(ATTACKER_NAMESPACE, f"attacker-{flood.replace('_', '-')}", "node-1",
                                    meshed=False, service_account="attacker") for flood in FLOODS}
    credentials = attacker_credentials(ctx)
    untrusted = untrusted_credentials()
    seconds = ctx.seconds(30, 10)
    echo = server.spawn([sys.executable, "-c", ECHO_APP, str(PORT)], log=ctx.workdir / "echo.log")
    try:
        time.sleep(1.0)
        for phase in ("baseline", *FLOODS):
            ctx.log(f"  {phase}: victim at {VICTIM_RATE} connections/s for {seconds:.0f} s")
            flood = None
            if phase != "baseline":
                flood = attackers[phase].spawn(flood_command(ctx, phase, server.ip, seconds, credentials, untrusted),
                                               log=ctx.workdir / f"{phase}-attacker.log")
                time.sleep(1.0)   # the flood is on before the victim starts
            victim_log = ctx.workdir / f"{phase}-victim.log"
            with procstat.ProcessSampler(ctx.bed.component_pids("proxy", nodes=("node-2",)), interval=0.5) as sampler:
                victim = client.spawn([sys.executable, "-c", SOAK_CLIENT, server.ip, str(PORT), str(VICTIM_RATE),
                                       str(seconds)], log=victim_log)
                try:
                    victim.wait(seconds + 120)
                finally:
                    ctx.bed.stop(victim)
                    if flood is not None:
                        try:
                            flood.wait(30)
                        finally:
                            ctx.bed.stop(flood)
            result = summary_of(victim_log)
            attack = summary_of(ctx.workdir / f"{phase}-attacker.log") if flood is not None else None
            reasons = ", ".join(f"{n} {why}" for why, n in sorted(result["reasons"].items())) or "none"
            note = f"{result['ok']} of {result['ok'] + result['failed']} succeeded ({reasons})"
            if attack is not None:
                note += "; " + attacker_note(attack)
            ctx.log(f"  {phase}: {note}; victim p99 {result['p99']}")
            yield Measurement(BENCH, phase, "failures", "count", (float(result["failed"]),), "lower", note)
            if result["p99"] is not None:
                yield Measurement(BENCH, phase, "p99", "ms", (result["p99"] * 1000,), "lower",
                                  f"connect + one echo; p50 {result['p50'] * 1000:.1f} ms")
            if sampler.usage is not None:
                yield Measurement(BENCH, phase, "rss", "MB", (sampler.usage.rss_peak_mb,), "lower",
                                  "node-2 proxy (the flooded one), peak")
                yield Measurement(BENCH, phase, "proxy_cpu", "cores", (round(sampler.usage.cpu_cores, 3),), "lower",
                                  "node-2 proxy (the flooded one), average over the phase")
    finally:
        ctx.bed.stop(echo)


SCENARIO = Scenario(
    name="h2flood",
    title="HTTP/2 floods on 15008 from a certificate holder, and a TLS handshake flood: another client's "
          "failures and p99",
    run=run,
    requires=("root", "cluster"),
    targets=tuple(t for flood in FLOODS for t in (
        Target(BENCH, "failures", flood, "<=", 0),
        Target(BENCH, "p99", flood, "<=", 2.0, kind="ratio", against="baseline"),
    )),
    order=61,
    timeout=900.0,
)
