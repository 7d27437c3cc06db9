"""TLS handshakes in progress on an HBONE listener (15008: the node proxy's in every pod,
the waypoint's), bounded per source address and per worker, and the sources that keep
failing them (issue 18). Pure: the caller gives the time and owns the sockets; the keys
it registers are opaque here. Both daemons take the bounds from their flags
(``HandshakeLimits``, ``add_flags``/``limits_from_args``), so they are the same by default.

A handshake costs the proxy before it knows who is calling: a socket, an SSL object and
a setup slot for up to the handshake timeout, and a signature and a chain verification
when it completes. Any sender that reaches 15008 can open thousands of connections and
never finish (or send garbage ClientHellos, or present a certificate we do not trust);
until these limits, nothing but the per-kind setup cap (8,192) bounded that, and a flood
that filled it paused the accept of every pod's 15008 until the handshakes timed out.

- **Per source** (``per_source``): the source IP on 15008 is the client pod's own (its
  node proxy dials from inside the pod; a waypoint is dialled the same way), so one pod's
  flood is refused at accept beyond it and costs no other pod anything. A legitimate pod dials far fewer at once: its node
  proxy opens one HBONE connection per 100 streams waiting, so even a 10,000-connection
  burst is about 100 dials per worker of it.
- **Overall** (``total``, per worker): memory is the reason. A handshake in progress held
  about 230 KB of the worker (the h2flood ``handshake`` run, measured under load: 256
  never-finished ones from one pod took the worker from 102 to 160 MB; the TLS transport's
  read buffer is 256 KiB), so 256 of them are ~60 MB at most, whoever sends them. Past it, the source holding the most handshakes
  loses its oldest one to the newcomer (a fair share, as a fair queue would give), or the
  newcomer is refused when it is itself that source. So many attacking pods together
  cannot keep a well-behaved pod from completing its handshakes.
- **A reconnect loop at the cap** (``cap_refusals``): a source refused at its cap that many
  times within ``window`` is boxed the same way. Holders that never finish stay within
  the cap, and each one the timeout ends comes back at once, so the cap alone refused the
  h2flood ``handshake`` attacker about 4,600 times a second, an accept and a reset each,
  without ever boxing it. A node proxy that meets the cap in a burst backs off after a
  refused dial; 1,000 refusals within a minute is a loop, not a burst.
- **Failures** (``failures``): a source whose handshakes fail (garbage, an untrusted or
  non-SPIFFE certificate; the caller decides which failures count) that many times within ``window`` seconds is
  reported once, so the caller puts it in the penalty box (``shoal.hbone.penalty``: refused at accept,
  before TLS, for a while that doubles per repeat) and cuts its handshakes in progress.
  A legitimate node proxy fails none: it holds a certificate from the mesh CA.

Tables are bounded: sources with handshakes in progress by ``total``, failing sources by
``capacity`` (oldest forgotten first).
"""
from __future__ import annotations

import argparse
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Mapping

from shoal.hbone.penalty import PenaltyBox

# Why a handshake in progress was cut by the gate (the caller's metric reason).
EVICTED = "handshake_capacity"        # the worker's total was reached; its source held the most
PENALISED = "handshake_failures"      # its source failed too many handshakes and was boxed
RECONNECT_LOOP = "handshake_reconnect_loop"   # its source kept dialling at its cap and was boxed
SOURCE_CAP = "handshake_source_cap"   # refused at accept: its source has per_source in progress


@dataclass
class _Failures:
    count: int
    since: float


@dataclass(frozen=True)
class HandshakeLimits:
    """The gate's bounds, the penalty box's waits and the handshake timeout, as a daemon's
    config holds them (one definition for both daemons: their flags are ``FLAGS``)."""
    per_source: int = 128          # handshakes in progress from one source address
    total: int = 256               # handshakes in progress in one worker, whoever sends them
    failures: int = 20             # failed handshakes of one source within ``window``: boxed
    window: float = 60.0
    penalty: float = 2.0           # a boxed source's first wait, doubling per repeat...
    longest_penalty: float = 60.0  # ...up to this
    # A handshake not done by then is cut (reason handshake_timeout): the longest an idle
    # holder keeps its slot under ``per_source``. Also the node proxy's own outbound dials'.
    timeout: float = 10.0
    cap_refusals: int = 1000       # refusals of one source at ``per_source`` within ``window``: boxed

    def __post_init__(self) -> None:
        problems = _problems(vars(self))
        if problems:
            raise ValueError("; ".join(f"{name}: {why}" for name, why in problems))

    def gate(self) -> "HandshakeGate":
        return HandshakeGate(self.per_source, self.total, self.failures, self.window,
                             cap_refusals=self.cap_refusals)

    def penalty_box(self) -> PenaltyBox:
        return PenaltyBox(first=self.penalty, longest=self.longest_penalty)


def _problems(values: Mapping[str, float]) -> list[tuple[str, str]]:
    """(field, why) for each of ``HandshakeLimits``'s values that cannot work."""
    checks = (("per_source", values["per_source"] < 1, "at least 1"),
              ("total", values["total"] < values["per_source"], "at least the per-source cap"),
              ("failures", values["failures"] < 1, "at least 1"),
              ("cap_refusals", values["cap_refusals"] < 1, "at least 1"),
              ("window", values["window"] <= 0, "positive"),
              ("penalty", values["penalty"] <= 0, "positive"),
              ("longest_penalty", values["longest_penalty"] < values["penalty"], "at least the first penalty"),
              ("timeout", values["timeout"] <= 0, "positive"))
    return [(name, f"must be {why}") for name, bad, why in checks if bad]


# The flags of ``HandshakeLimits``, the same in both daemons: (flag, field, type, help).
FLAGS = (
    ("--max-handshakes-per-source", "per_source", int, "TLS handshakes in progress on 15008 from one source "
     "address; more are refused at accept"),
    ("--max-handshakes", "total", int, "TLS handshakes in progress on 15008 per worker; past it the source "
     "holding the most loses its oldest"),
    ("--handshake-failures", "failures", int, "failed handshakes of one source (within "
     "--handshake-failure-window) before it goes in the penalty box"),
    ("--handshake-cap-refusals", "cap_refusals", int, "refusals of one source at "
     "--max-handshakes-per-source (within --handshake-failure-window) before it goes in the penalty box"),
    ("--handshake-failure-window", "window", float, "seconds over which handshake failures and cap "
     "refusals are counted"),
    ("--abuser-penalty", "penalty", float, "seconds a source cut off for abuse is refused at accept, "
     "doubling per repeat"),
    ("--abuser-longest-penalty", "longest_penalty", float, "the longest such wait, seconds"),
    ("--handshake-timeout", "timeout", float, "seconds a TLS handshake on 15008 may take before it is cut"),
)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """The handshake, timeout and penalty flags, with today's defaults."""
    defaults = HandshakeLimits()
    group = parser.add_argument_group("HBONE handshakes and abuse limits (15008)")
    for flag, name, kind, text in FLAGS:
        group.add_argument(flag, type=kind, default=getattr(defaults, name), dest=f"handshake_{name}",
                           help=f"{text} (default {getattr(defaults, name)})")


def limits_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> HandshakeLimits:
    """The limits ``add_flags`` read; values that cannot work are a usage error naming them."""
    values = {name: getattr(args, f"handshake_{name}") for _, name, _, _ in FLAGS}
    flags = {name: flag for flag, name, _, _ in FLAGS}
    problems = _problems(values)
    if problems:
        parser.error("; ".join(f"{flags[name]} {why} (got {values[name]})" for name, why in problems))
    return HandshakeLimits(**values)


class HandshakeGate:
    """Handshakes in progress per source and overall, and failing sources."""

    def __init__(self, per_source: int = 128, total: int = 256, failures: int = 20,
                 window: float = 60.0, capacity: int = 4096, cap_refusals: int = 1000) -> None:
        if per_source < 1 or total < per_source:
            raise ValueError("per_source must be at least 1 and total at least per_source")
        self.per_source, self.total, self.failures, self.window, self.capacity = \
            per_source, total, failures, window, capacity
        self.cap_refusals = cap_refusals
        # source -> its handshakes in progress, oldest first (insertion-ordered dicts as sets)
        self._open: dict[str, dict[Hashable, None]] = {}
        self._count = 0
        self._cut: dict[Hashable, str] = {}   # keys cut while in progress -> why, until finish()
        self._failing: OrderedDict[str, _Failures] = OrderedDict()
        self._capped: OrderedDict[str, _Failures] = OrderedDict()   # refusals at the cap, alike

    def __len__(self) -> int:
        """Handshakes in progress (cut ones excluded)."""
        return self._count

    def at_cap(self, source: str) -> bool:
        """Whether ``source`` holds ``per_source`` handshakes already: the acceptor refuses its
        next connection before it costs a task or a TLS object (``admit`` checks again)."""
        mine = self._open.get(source)
        return mine is not None and len(mine) >= self.per_source

    def admit(self, source: str, key: Hashable) -> tuple[str | None, list[Hashable]]:
        """A new connection from ``source`` wants to handshake: (refusal reason or None, the
        keys of handshakes in progress to cut now to make room for it)."""
        mine = self._open.get(source)
        if mine is not None and len(mine) >= self.per_source:
            return SOURCE_CAP, []
        victims: list[Hashable] = []
        if self._count >= self.total:
            largest = max(self._open, key=lambda s: len(self._open[s]))
            if len(self._open[largest]) <= (len(mine) if mine else 0):
                return EVICTED, []
            victims.append(self._take_oldest(largest, EVICTED))
        self._open.setdefault(source, {})[key] = None
        self._count += 1
        return None, victims

    def finish(self, source: str, key: Hashable) -> str | None:
        """The handshake of ``key`` ended (either way): None, or why the gate cut it."""
        reason = self._cut.pop(key, None)
        if reason is not None:
            return reason
        mine = self._open.get(source)
        if mine is not None and key in mine:
            del mine[key]
            self._count -= 1
            if not mine:
                del self._open[source]
        return None

    def failed(self, source: str, now: float) -> list[Hashable] | None:
        """A handshake from ``source`` failed at ``now``. None, or (once per ``failures``
        within ``window``) the keys of its handshakes in progress: penalise the source and
        cut those."""
        return self._strike(self._failing, self.failures, source, now, PENALISED)

    def refused_at_cap(self, source: str, now: float) -> list[Hashable] | None:
        """``source`` was refused at its per-source cap at ``now``. None, or (once per
        ``cap_refusals`` within ``window``) the keys of its handshakes in progress: a
        reconnect loop against the cap, to penalise and cut as ``failed`` says."""
        return self._strike(self._capped, self.cap_refusals, source, now, RECONNECT_LOOP)

    def _strike(self, table: OrderedDict[str, _Failures], limit: int, source: str, now: float,
                reason: str) -> list[Hashable] | None:
        record = table.pop(source, None)
        if record is None or now - record.since > self.window:
            record = _Failures(0, now)
        record.count += 1
        if record.count < limit:
            table[source] = record   # the most recent last: the oldest go first
            while len(table) > self.capacity:
                table.popitem(last=False)
            return None
        mine = self._open.get(source, {})
        return [self._take_oldest(source, reason) for _ in range(len(mine))]

    def _take_oldest(self, source: str, reason: str) -> Hashable:
        mine = self._open[source]
        key = next(iter(mine))
        del mine[key]
        if not mine:
            del self._open[source]
        self._count -= 1
        self._cut[key] = reason
        return key
