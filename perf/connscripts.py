"""Scripts run inside pods (``python -c SCRIPT args``) to load a node proxy with many
concurrent connections: the ``load`` scenario and the node proxy's cluster tests share
them, so the test and the benchmark measure the same thing."""
from __future__ import annotations

import json
from pathlib import Path


def summary_of(log: Path) -> dict:
    """The JSON summary these scripts print last, from the log their output went to."""
    lines = log.read_text().strip().splitlines() if log.exists() else []
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"{log.name}: no summary: {' | '.join(lines[-3:])}") from None

# An echo app: asyncio, a backlog that takes a burst (the demo's db answers
# from a 5-deep ThreadingTCPServer queue, which would measure the app, not the proxies).
# Args: port.
ECHO_APP = """
import asyncio, sys
async def serve(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    writer.close()
async def main():
    server = await asyncio.start_server(serve, "0.0.0.0", int(sys.argv[1]), backlog=4096)
    print("listening", flush=True)
    await server.serve_forever()
asyncio.run(main())
"""

# Opens COUNT connections at once, holds every one open until all have exchanged a line,
# then (for SECONDS, 0 for none) pings each every half second, then prints a JSON summary
# (ok, n_failed, failures by reason, lost, pings, open_seconds). Args: host port count seconds.
HOLD_CLIENT = """
import asyncio, json, resource, sys, time
host, port, count, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
async def exchange(reader, writer, line):
    writer.write(line)
    return await asyncio.wait_for(reader.readexactly(len(line)), 30) == line
async def one(i, held):
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 60)
        if not await exchange(reader, writer, b"hello %d\\n" % i):
            return f"{i}: bad echo", "bad echo"
        held.append((i, reader, writer))
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
        return f"{i}: {exc!r}", type(exc).__name__ + (f"[errno {exc.errno}]" if getattr(exc, "errno", None) else "")
async def main():
    held, started = [], time.monotonic()
    failed = [r for r in await asyncio.gather(*(one(i, held) for i in range(count))) if r]
    reasons = {}
    for _, why in failed:
        reasons[why] = reasons.get(why, 0) + 1
    opened = time.monotonic() - started
    lost, pings = set(), 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        async def ping(i, reader, writer):
            try:
                return await exchange(reader, writer, b"ping %d\\n" % i)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                return False
        results = await asyncio.gather(*(ping(*h) for h in held if h[0] not in lost))
        pings += len(results)
        lost |= {h[0] for h, ok in zip([h for h in held if h[0] not in lost], results) if not ok}
        await asyncio.sleep(0.5)
    for _, _, writer in held:
        writer.close()
    print(json.dumps({"ok": len(held), "failed": [f for f, _ in failed[:20]], "n_failed": len(failed),
                      "reasons": reasons, "lost": sorted(lost),
                      "pings": pings, "open_seconds": round(opened, 2)}))
asyncio.run(main())
"""

# Opens RATE connections a second for SECONDS, each echoing a line (connect and echo within
# TIMEOUT s each, default 10), and holds no finished task (an hour at 200/s is 720,000 of
# them). Prints a JSON progress line every PROGRESS seconds and a JSON summary last: ok,
# failed, the failures by reason (exception type and errno), the first few errors, the
# p50/p99/max seconds of connect + echo, and per WINDOW seconds of the run (by when each
# connection started; only windows with any) the failures and the connections slower than
# 1 s: whether trouble is spread over the run or bunched (say, right after a burst).
# Args: host port rate seconds [timeout].
SOAK_CLIENT = """
import asyncio, collections, json, sys, time
host, port, rate, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
TIMEOUT = float(sys.argv[5]) if len(sys.argv) > 5 else 10.0
PROGRESS, WINDOW = 60.0, 5
ok, reasons, errors, latencies = 0, collections.Counter(), [], []
failed_by_window, slow_by_window = collections.Counter(), collections.Counter()
def reason(exc):
    errno = getattr(exc, "errno", None)
    return type(exc).__name__ + (f"[errno {errno}]" if errno else "")
async def one(i):
    global ok
    line = b"soak %d\\n" % i
    began = time.monotonic()
    window = int(i / rate) // WINDOW * WINDOW
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT)
        try:
            w.write(line)
            if await asyncio.wait_for(r.readexactly(len(line)), TIMEOUT) != line:
                raise ValueError("bad echo")
        finally:
            w.close()
        ok += 1
        latencies.append(time.monotonic() - began)
        if latencies[-1] > 1.0:
            slow_by_window[window] += 1
    except (OSError, ValueError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
        reasons[reason(exc)] += 1
        failed_by_window[window] += 1
        if len(errors) < 10:
            errors.append(f"{i}: {exc!r}")
def percentile(values, q):
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 4) if values else None
async def main():
    pending, start = set(), time.monotonic()
    next_report = start + PROGRESS
    for i in range(int(rate * seconds)):
        task = asyncio.ensure_future(one(i))
        pending.add(task)
        task.add_done_callback(pending.discard)
        now = time.monotonic()
        if now >= next_report:
            next_report += PROGRESS
            print(json.dumps({"t": round(now - start), "ok": ok, "failed": sum(reasons.values()),
                              "pending": len(pending)}), flush=True)
        await asyncio.sleep(max(0, start + (i + 1) / rate - now))
    if pending:
        await asyncio.wait(pending)
    print(json.dumps({"ok": ok, "failed": sum(reasons.values()), "reasons": dict(reasons), "errors": errors,
                      "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
                      "max": round(max(latencies), 4) if latencies else None, "window": WINDOW,
                      "failed_by_window": dict(sorted(failed_by_window.items())),
                      "slow_by_window": dict(sorted(slow_by_window.items()))}), flush=True)
asyncio.run(main())
"""

# An HTTP/2 flood on a pod's 15008 from a certificate holder (issue 18's attacks), for
# SECONDS: on each connection it floods until the proxy closes it, then reconnects.
# KIND: rapid_reset (CONNECT + RST_STREAM pairs), ping, settings, continuation (one header
# block that never ends). Prints a JSON summary: connections, frames sent, GOAWAY codes
# received, connections the proxy stopped reading. Args: host port authority kind seconds cert_chain_pem key_pem roots_pem.
H2_FLOOD_CLIENT = """
import asyncio, collections, json, ssl, sys, tempfile, time
import h2.config, h2.connection, hyperframe.frame
host, port, authority, kind, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.load_verify_locations(cadata=sys.argv[8])
with tempfile.NamedTemporaryFile("w") as chain, tempfile.NamedTemporaryFile("w") as key:
    chain.write(sys.argv[6]); chain.flush(); key.write(sys.argv[7]); key.flush()
    context.load_cert_chain(chain.name, key.name)
context.set_alpn_protocols(["h2"])
stats = {"connections": 0, "frames": 0, "stalled": 0, "goaway": collections.Counter(), "errors": collections.Counter()}
PING = hyperframe.frame.PingFrame(0, opaque_data=bytes(8)).serialize()
SETTINGS = hyperframe.frame.SettingsFrame(0, settings={4: 1 << 20}).serialize()
BLOCK = bytes(16 * 1024)
async def read_until_closed(reader):
    # Frames are scanned by hand: h2 raises on answers to streams we already reset, and
    # would drop the GOAWAY that came in the same read.
    buffer = b""
    try:
        while data := await reader.read(65536):
            buffer += data
            while len(buffer) >= 9:
                length = int.from_bytes(buffer[:3], "big")
                if len(buffer) < 9 + length:
                    break
                if buffer[3] == 0x7 and length >= 8:   # GOAWAY: last stream id, error code
                    stats["goaway"][str(int.from_bytes(buffer[13:17], "big"))] += 1
                buffer = buffer[9 + length:]
    except ConnectionError:
        pass
def batch(conn, next_id):
    if kind == "rapid_reset":
        for stream_id in range(next_id, next_id + 200, 2):
            conn.send_headers(stream_id, [(":method", "CONNECT"), (":authority", authority)])
            conn.reset_stream(stream_id)
        return conn.data_to_send(), 100, next_id + 200
    if kind == "ping":
        return PING * 1000, 1000, next_id
    if kind == "settings":
        return SETTINGS * 1000, 1000, next_id
    if next_id == 1:   # continuation: the header block's first frame, then its endless tail
        return hyperframe.frame.HeadersFrame(1, data=BLOCK).serialize(), 1, 3
    return hyperframe.frame.ContinuationFrame(1, data=BLOCK).serialize() * 8, 8, next_id
async def one_connection(deadline):
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=context, server_hostname=""), 10)
    stats["connections"] += 1
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, validate_outbound_headers=False))
    conn.initiate_connection()
    conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1000})
    writer.write(conn.data_to_send())
    reader_task = asyncio.ensure_future(read_until_closed(reader))
    next_id = 1
    try:
        while time.monotonic() < deadline and not reader_task.done():
            data, frames, next_id = batch(conn, next_id)
            writer.write(data)
            await asyncio.wait_for(writer.drain(), 2)
            stats["frames"] += frames
    except ConnectionError:
        pass
    except asyncio.TimeoutError:
        stats["stalled"] += 1   # the proxy stopped reading us
    if not reader_task.done():
        await asyncio.wait({reader_task}, timeout=1)   # a GOAWAY on its way is still counted
        reader_task.cancel()
    writer.close()
async def main():
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            await one_connection(deadline)
        except (OSError, asyncio.TimeoutError) as exc:
            stats["errors"][type(exc).__name__] += 1
            await asyncio.sleep(0.1)
    print(json.dumps({**stats, "goaway": dict(stats["goaway"]), "errors": dict(stats["errors"])}), flush=True)
asyncio.run(main())
"""

# A TLS handshake flood on a pod's 15008 (issue 18), from one source: ``idle`` connections
# kept open that start a ClientHello and never finish it (each reopened as soon as the
# proxy ends it), and ``loops`` loops each of garbage ClientHellos and of complete
# handshakes with a certificate the mesh CA never issued. Prints one JSON summary.
# Args: host, port, seconds, idle, loops, untrusted chain PEM, its key PEM.
HANDSHAKE_FLOOD_CLIENT = """
import asyncio, collections, contextlib, json, os, resource, ssl, sys, tempfile, time
host, port, seconds, idle, loops = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
with tempfile.NamedTemporaryFile("w") as chain, tempfile.NamedTemporaryFile("w") as key:
    chain.write(sys.argv[6]); chain.flush(); key.write(sys.argv[7]); key.flush()
    context.load_cert_chain(chain.name, key.name)
context.set_alpn_protocols(["h2"])
# A TLS record announcing a 512-byte ClientHello, of which only the start is ever sent.
PARTIAL_HELLO = bytes([0x16, 3, 1, 2, 0, 1, 0, 1, 0xfc, 3, 3])
stats = {"idle_open": 0, "idle_peak": 0, "idle_opened": 0, "idle_held_s": 0.0, "garbage": 0, "untrusted": 0,
         "untrusted_accepted": 0, "reset": 0, "errors": collections.Counter()}
async def until_closed(reader, limit):
    try:
        while await asyncio.wait_for(reader.read(65536), limit):
            pass
    except ConnectionResetError:
        stats["reset"] += 1
async def connect():
    return await asyncio.wait_for(asyncio.open_connection(host, port), 5)
# Every loop pauses between attempts, ended well or not: a holder cut at the handshake
# timeout does not take its slot back before the other loops can try for it, so the
# garbage and untrusted handshakes get their share of the freed slots (they used to lose
# every race to the 200 holders, and the source was never boxed).
async def guarded(deadline, attempt):
    while time.monotonic() < deadline:
        try:
            await attempt(deadline)
        except (OSError, asyncio.TimeoutError, EOFError) as exc:
            stats["errors"][type(exc).__name__] += 1
        await asyncio.sleep(0.05)
async def hold_idle(deadline):
    reader, writer = await connect()
    stats["idle_opened"] += 1
    stats["idle_open"] += 1
    stats["idle_peak"] = max(stats["idle_peak"], stats["idle_open"])
    began = time.monotonic()
    try:
        writer.write(PARTIAL_HELLO)
        with contextlib.suppress(asyncio.TimeoutError):   # still held at the end of the run
            await until_closed(reader, max(0.1, deadline - time.monotonic()))
    finally:
        stats["idle_open"] -= 1
        stats["idle_held_s"] += time.monotonic() - began
        writer.close()
async def garbage(deadline):
    reader, writer = await connect()
    writer.write(bytes([0x16, 3, 1, 2, 0]) + os.urandom(512))
    stats["garbage"] += 1
    try:
        await until_closed(reader, 10)
    finally:
        writer.close()
async def untrusted(deadline):
    stats["untrusted"] += 1
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=context, server_hostname=""), 10)
    except ssl.SSLError:
        return
    try:   # TLS 1.3: the client's handshake ends before the server has checked its certificate
        if await asyncio.wait_for(reader.read(1), 10):
            stats["untrusted_accepted"] += 1
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()
async def main():
    deadline = time.monotonic() + seconds
    tasks = [guarded(deadline, hold_idle) for _ in range(idle)]
    tasks += [guarded(deadline, job) for _ in range(loops) for job in (garbage, untrusted)]
    await asyncio.gather(*tasks)
    print(json.dumps({**stats, "idle_held_s": round(stats["idle_held_s"], 1), "errors": dict(stats["errors"])}), flush=True)
asyncio.run(main())
"""
