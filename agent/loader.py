"""Pinned maps, and bcc compilation/loading/attachment of the per-attach-point programs.

Order of operations (so a node is never half-attached):
1. open the node's pinned maps, creating and pinning the missing ones;
2. compile every program (one clang unit), with map fds and feature flags as -D flags, and load each;
   the first failure raises ProgramLoadError naming the program and the verifier's
   reason, before anything was attached or replaced;
3. pin the programs and attach the cgroup ones to the node's root cgroup. A legacy
   (non-multi) cgroup attach atomically replaces the previous agent's program, so a
   restart never leaves a window without capture.
"""
from __future__ import annotations

import errno
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shoal.datapath import bpfsys
from shoal.datapath.btf import Btf, BtfError
from shoal.datapath.structs import MAPS, MapSpec

log = logging.getLogger(__name__)


class ProgramLoadError(RuntimeError):
    """A program failed to compile or verify; nothing was attached."""

    def __init__(self, program: str, reason: str):
        super().__init__(f"eBPF program {program!r} failed to load: {reason}")
        self.program = program
        self.reason = reason


@dataclass(frozen=True)
class ProgramSpec:
    name: str          # also the pin name
    source: str        # file in bpf/
    function: str
    prog_type: str | int     # bcc BPF.<prog_type>, or the kernel's number when bcc has no name
    attach_type: int | None  # cgroup attach type; None for per-pod programs (tc, sk_lookup)
    expected_attach_type: int | None = None   # checked by the kernel at load time


def _sock_addr(name: str, attach_type: int) -> ProgramSpec:
    return ProgramSpec(name, f"{name}.c", f"shoal_{name}", "CGROUP_SOCK_ADDR", attach_type)


PROGRAMS: tuple[ProgramSpec, ...] = (
    _sock_addr("connect4", bpfsys.ATTACH_CGROUP_INET4_CONNECT),
    _sock_addr("connect6", bpfsys.ATTACH_CGROUP_INET6_CONNECT),
    ProgramSpec("sockops", "sockops.c", "shoal_sockops", "SOCK_OPS", bpfsys.ATTACH_CGROUP_SOCK_OPS),
    _sock_addr("getpeername4", bpfsys.ATTACH_CGROUP_INET4_GETPEERNAME),
    _sock_addr("getpeername6", bpfsys.ATTACH_CGROUP_INET6_GETPEERNAME),
    _sock_addr("sendmsg4", bpfsys.ATTACH_CGROUP_UDP4_SENDMSG),
    _sock_addr("sendmsg6", bpfsys.ATTACH_CGROUP_UDP6_SENDMSG),
    _sock_addr("recvmsg4", bpfsys.ATTACH_CGROUP_UDP4_RECVMSG),
    _sock_addr("recvmsg6", bpfsys.ATTACH_CGROUP_UDP6_RECVMSG),
    ProgramSpec("tc_ingress", "tc_ingress.c", "shoal_tc_ingress", "SCHED_CLS", None),
    ProgramSpec("sk_lookup", "sk_lookup.c", "shoal_sk_lookup", bpfsys.PROG_TYPE_SK_LOOKUP, None,
                bpfsys.ATTACH_SK_LOOKUP),
    # attached to the bypass_socks map, not to a cgroup (attach_bypass)
    ProgramSpec("sk_skb_bypass", "sk_skb_bypass.c", "shoal_sk_skb_bypass", "SK_SKB", None),
    # attached to the app_socks map (attach_bypass)
    ProgramSpec("sk_msg_join", "sk_msg_join.c", "shoal_sk_msg_join", "SK_MSG", None),
)
CGROUP_PROGRAMS = tuple(p for p in PROGRAMS if p.attach_type is not None)


@dataclass(frozen=True)
class FeatureFlags:
    """Compile-time switches, passed as -D flags (no text surgery on the C)."""
    port_outbound: int
    port_inbound: int
    port_hbone: int
    flow_events: bool = True
    socket_lb: bool = True

    def cflags(self) -> list[str]:
        return [
            f"-DSHOAL_PORT_OUTBOUND={self.port_outbound}",
            f"-DSHOAL_PORT_INBOUND={self.port_inbound}",
            f"-DSHOAL_PORT_HBONE={self.port_hbone}",
            f"-DSHOAL_FLOW_EVENTS={int(self.flow_events)}",
            f"-DSHOAL_SOCKET_LB={int(self.socket_lb)}",
        ]


def kernel_layout_cflags() -> list[str]:
    """Offsets of the kernel struct members the programs read (the running kernel's, from
    BTF: the headers bcc compiles with may be another kernel's). Without BTF none is
    defined, and the programs that need one take their safe path (sk_skb_bypass.c: every
    byte handed back to the proxy; sk_msg_join.c: no send redirected)."""
    try:
        btf = Btf.of_running_kernel()
        return [f"-DSHOAL_TCP_SOCK_WRITE_SEQ={btf.member_offset('tcp_sock', 'write_seq')}",
                f"-DSHOAL_SOCK_RCVBUF={btf.member_offset('sock', 'sk_rcvbuf')}",
                f"-DSHOAL_SOCK_SK_SOCKET={btf.member_offset('sock', 'sk_socket')}",
                f"-DSHOAL_SOCKET_FILE={btf.member_offset('socket', 'file')}",
                f"-DSHOAL_FILE_F_FLAGS={btf.member_offset('file', 'f_flags')}"]
    except BtfError as exc:
        log.warning("kernel BTF unusable (%s): the same-node bypass hands every byte to the proxy", exc)
        return []


class PinnedMaps:
    """The node's maps, pinned at <pin_dir>/<name>; created on first use, adopted after."""

    def __init__(self, pin_dir: Path, create: bool = True):
        self.pin_dir = Path(pin_dir)
        self.fds: dict[str, int] = {}
        self.adopted: list[str] = []
        self.replaced: list[str] = []
        if create:
            self.pin_dir.mkdir(parents=True, exist_ok=True)
        for spec in MAPS:
            self.fds[spec.name] = self._open(spec, create)

    def _open(self, spec: MapSpec, create: bool) -> int:
        path = self.pin_dir / spec.name
        try:
            fd = bpfsys.obj_get(path)
        except bpfsys.BpfError as err:
            if err.errno != errno.ENOENT or not create:
                raise
        else:
            info = bpfsys.map_info(fd)
            found = (info.type, info.key_size, info.value_size, info.max_entries)
            wanted = (spec.map_type, spec.key_size, spec.value_size, spec.max_entries)
            if found == wanted or not create:
                self.adopted.append(spec.name)
                return fd
            # An upgrade changed this map's layout: programs must never see the old one.
            log.warning("pinned map %s has layout %s, this agent needs %s: replacing it (its entries are lost)",
                        spec.name, found, wanted)
            os.close(fd)
            path.unlink()
            self.replaced.append(spec.name)
        fd = bpfsys.map_create(spec.map_type, spec.key_size, spec.value_size, spec.max_entries, spec.name)
        bpfsys.obj_pin(fd, path)
        return fd

    def cflags(self) -> list[str]:
        return [f"-DSHOAL_MAP_FD_{name}={fd}" for name, fd in self.fds.items()]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


class _CapturedStderr:
    """bcc prints compiler errors and the verifier log on fd 2: keep them for the error."""

    def __enter__(self):
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode(errors="replace")
        self._file.close()
        return False


def _verifier_reason(log_text: str, fallback: str) -> str:
    """The verifier's own words: the last meaningful lines of its log."""
    lines = [line for line in log_text.strip().splitlines()
             if line.strip() and not line.startswith(("processed ", "HINT"))]
    if not lines:
        return fallback
    return " | ".join(lines[-3:])


def _failing_source(compiler_text: str) -> str:
    """The program whose file clang complains about first ('…/tc_ingress.c:12:5: error')."""
    by_source = {spec.source: spec.name for spec in PROGRAMS}
    for line in compiler_text.splitlines():
        if ": error" in line:
            source = Path(line.split(":", 1)[0]).name
            return by_source.get(source, source)
    return "bpf"


class LoadedProgram:
    def __init__(self, spec: ProgramSpec, module, fd: int):
        self.spec = spec
        self.module = module  # keeps the bcc module, hence the program fd, alive
        self.fd = fd


class Datapath:
    """Compiles, loads, pins and attaches the node's programs."""

    def __init__(self, pin_dir: Path, flags: FeatureFlags, source_dir: Path | None = None):
        from shoal import bpf as bpf_sources
        self.pin_dir = Path(pin_dir)
        self.flags = flags
        self.source_dir = Path(source_dir) if source_dir else bpf_sources.SOURCE_DIR
        self.maps = PinnedMaps(self.pin_dir)
        self.programs: dict[str, LoadedProgram] = {}

    def load(self) -> None:
        """Compile every program in one clang run (one unit of every attach point's file: a
        bcc compile costs seconds, a verification milliseconds), then verify each;
        raises ProgramLoadError naming the program on the first failure."""
        from bcc import BPF  # only the loader needs bcc (and clang) on the path
        cflags = [f'-DSHOAL_PIN_DIR="{self.pin_dir}"', f"-I{self.source_dir}"]
        cflags += self.flags.cflags() + self.maps.cflags() + kernel_layout_cflags()
        # bcc takes as programs only functions of its main file: the sources are joined,
        # each behind a #line so compiler errors still name its file.
        unit = "".join(f'#line 1 "{spec.source}"\n' + (self.source_dir / spec.source).read_text() + "\n"
                       for spec in PROGRAMS)
        with _CapturedStderr() as captured:
            try:
                module = BPF(text=unit.encode(), cflags=cflags)
            except Exception as err:  # noqa: BLE001 - bcc raises bare Exception for compile errors
                failure = err
            else:
                failure = None
        if failure is not None:
            program = _failing_source(captured.text)
            reason = _verifier_reason(captured.text, str(failure))
            log.error("eBPF program %s failed to compile: %s\n%s", program, reason, captured.text)
            raise ProgramLoadError(program, reason) from failure
        loaded = {}
        try:
            for spec in PROGRAMS:
                with _CapturedStderr() as captured:
                    try:
                        kwargs = {}
                        if spec.prog_type == "CGROUP_SOCK_ADDR":  # the kernel checks it at load time
                            kwargs["attach_type"] = spec.attach_type
                        if spec.expected_attach_type is not None:
                            kwargs["attach_type"] = spec.expected_attach_type
                        prog_type = spec.prog_type if isinstance(spec.prog_type, int) else getattr(BPF, spec.prog_type)
                        fn = module.load_func(spec.function.encode(), prog_type, **kwargs)
                    except Exception as err:  # noqa: BLE001 - bcc raises bare Exception for verifier errors
                        failure = err
                    else:
                        failure = None
                if failure is not None:
                    reason = _verifier_reason(captured.text, str(failure))
                    log.error("eBPF program %s failed to load: %s\n%s", spec.name, reason, captured.text)
                    raise ProgramLoadError(spec.name, reason) from failure
                loaded[spec.name] = LoadedProgram(spec, module, fn.fd)
        except ProgramLoadError:
            module.cleanup()
            raise
        self.programs = loaded

    def pin_programs(self) -> None:
        """Pin each program at <pin_dir>/prog_<name>, replacing the previous agent's pin."""
        for name, program in self.programs.items():
            path = self.pin_dir / f"prog_{name}"
            path.unlink(missing_ok=True)
            bpfsys.obj_pin(program.fd, path)

    def attach_cgroup(self, cgroup: Path) -> None:
        """Attach (or atomically replace) the cgroup programs on the node's root cgroup."""
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for spec in CGROUP_PROGRAMS:
                bpfsys.prog_attach(self.programs[spec.name].fd, fd, spec.attach_type)
        finally:
            os.close(fd)

    def missing_cgroup_programs(self, cgroup: Path) -> list[str]:
        """Our cgroup programs that are not attached to ``cgroup`` (detached or replaced by hand)."""
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return [spec.name for spec in CGROUP_PROGRAMS
                    if self.program_id(spec.name) not in bpfsys.prog_query(fd, spec.attach_type)]
        finally:
            os.close(fd)

    def program_id(self, name: str) -> int:
        return bpfsys.prog_info(self.programs[name].fd).id

    def attach_bypass(self) -> None:
        """Attach (or replace) the same-node bypass verdict on the bypass_socks map. It
        runs only for sockets the node proxy puts into that map; a restarted agent's
        attach replaces the previous program in place (the map keeps it meanwhile)."""
        bpfsys.prog_attach(self.programs["sk_skb_bypass"].fd, self.maps.fds["bypass_socks"],
                           bpfsys.ATTACH_SK_SKB_STREAM_VERDICT)
        # the apps' sends of joined pairs (sk_msg_join.c); only sockops fills app_socks
        bpfsys.prog_attach(self.programs["sk_msg_join"].fd, self.maps.fds["app_socks"],
                           bpfsys.ATTACH_SK_MSG_VERDICT)

    def tc_program_fd(self) -> int:
        return self.programs["tc_ingress"].fd

    def sk_lookup_program_fd(self) -> int:
        return self.programs["sk_lookup"].fd

    def start(self, cgroup: Path) -> None:
        self.load()
        self.pin_programs()
        self.attach_bypass()
        self.attach_cgroup(cgroup)

    def close(self) -> None:
        for module in {id(p.module): p.module for p in self.programs.values()}.values():
            module.cleanup()
        self.programs.clear()
        self.maps.close()


def detach_cgroup(pin_dir: Path, cgroup: Path) -> list[str]:
    """Detach the pinned cgroup programs from `cgroup` and unpin them; returns what was removed."""
    removed = []
    try:
        cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        cg_fd = None
    for spec in CGROUP_PROGRAMS:
        path = Path(pin_dir) / f"prog_{spec.name}"
        if not path.exists():
            continue
        prog_fd = bpfsys.obj_get(path)
        try:
            if cg_fd is not None:
                try:
                    bpfsys.prog_detach(prog_fd, cg_fd, spec.attach_type)
                    removed.append(f"cgroup:{spec.name}")
                except bpfsys.BpfError as err:
                    if err.errno not in (errno.ENOENT, errno.EINVAL):
                        raise
        finally:
            os.close(prog_fd)
    if cg_fd is not None:
        os.close(cg_fd)
    return removed


