"""`shoal debug bpf --node NODE [-o json]`: what the data path of a node holds right now.

Reads pins, cgroup attachments, tc filters and the enrolment state directly (no
agent API needed, works while the agent is down): programs, enrolled pods,
identities, services, L4 deny entries, counters and the measured capture cost.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from shoal.agent.loader import CGROUP_PROGRAMS, PROGRAMS
from shoal.agent.netns import NetnsError, tc_ingress_programs
from shoal.agent.uninstall import enrolment_state_path
from shoal.config import ClusterLayout
from shoal.datapath import bpfsys
from shoal.datapath.structs import ENDPOINT_LOCAL, ENDPOINT_MESHED, ENDPOINT_STRICT


def _programs(pin_dir: Path, cgroup: Path) -> list[dict]:
    attached: dict[int, set[int]] = {}
    try:
        cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        cg_fd = None
    if cg_fd is not None:
        for spec in CGROUP_PROGRAMS:
            attached[spec.attach_type] = set(bpfsys.prog_query(cg_fd, spec.attach_type))
        os.close(cg_fd)
    out = []
    for spec in PROGRAMS:
        path = pin_dir / f"prog_{spec.name}"
        row = {"name": spec.name, "source": spec.source, "pinned": path.exists()}
        if path.exists():
            fd = bpfsys.obj_get(path)
            try:
                info = bpfsys.prog_info(fd)
            finally:
                os.close(fd)
            row.update(id=info.id, tag=bytes(info.tag).hex(), kernel_name=info.name.decode())
            if spec.attach_type is not None:
                row["attached_to"] = str(cgroup) if info.id in attached.get(spec.attach_type, ()) else None
            else:
                row["attached_to"] = {"tc_ingress": "tc ingress of each enrolled pod",
                                      "sk_skb_bypass": "the bypass_socks map (the node proxy's same-node pairs)",
                                      }.get(spec.name, "a link in each enrolled pod's netns")
        out.append(row)
    return out


_PROTO_NAMES = {6: "TCP", 17: "UDP"}


def _hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _flags(flags: int) -> str:
    names = [name for bit, name in ((ENDPOINT_MESHED, "meshed"), (ENDPOINT_LOCAL, "local"),
                                    (ENDPOINT_STRICT, "strict")) if flags & bit]
    return ",".join(names) or "-"


def _host_netns_path(layout: ClusterLayout, known: dict) -> str:
    """The pod's namespace as this command sees it. The agent records its own view, which in
    a container (``shoal up --containers``) lies under its /host mounts: the local cluster's
    named namespace stands in when that path is not on this machine."""
    recorded = known["netns_path"]
    named = f"/run/netns/{layout.pod_netns(known.get('namespace', ''), known.get('name', ''))}"
    return named if not os.path.exists(recorded) and os.path.exists(named) else recorded


def collect(layout: ClusterLayout, node: str) -> dict:
    from shoal.agent.mapsync import DatapathMaps, histogram_quantile
    pin_dir = layout.bpf_pin_dir(node)
    if not (pin_dir / "enrolled_pods").exists():
        raise click.ClickException(f"no data path pinned for {node} of cluster {layout.name!r} ({pin_dir})")
    try:
        state = json.loads(enrolment_state_path(layout, node).read_text()).get("pods", [])
    except (FileNotFoundError, ValueError):
        state = []
    by_cookie = {pod["cookie"]: pod for pod in state if isinstance(pod, dict)}
    maps = DatapathMaps(pin_dir)
    try:
        pods = []
        for cookie, info in sorted(maps.pods().items()):
            known = by_cookie.get(cookie, {})
            tc = []
            if known.get("netns_path"):
                try:
                    tc = tc_ingress_programs(_host_netns_path(layout, known))
                except (NetnsError, OSError) as err:
                    tc = [f"error: {err}"]
            pods.append({"pod": f"{known.get('namespace', '?')}/{known.get('name', '?')}", "ip": info["ip"],
                         "identity": info["identity"], "netns_cookie": cookie, "tc": tc,
                         "sk_lookup": (pin_dir / "links" / f"sk_lookup_{cookie}").exists()})
        endpoints = [{"ip": ip, "identity": e.identity, "ns_id": e.ns_id, "flags": _flags(e.flags)}
                     for ip, e in sorted(maps.endpoints().items())]
        services = [{"service": _hostport(vip, port), "proto": _PROTO_NAMES.get(proto, str(proto)),
                     "backends": [_hostport(ip, p) for ip, p in backends]}
                    for (vip, port, proto), backends in sorted(maps.services().items())]
        policies = [{"src_identity": e.src_identity or "*", "dst_identity": e.dst_identity,
                     "port": e.dport or "*", "proto": _PROTO_NAMES.get(e.proto, e.proto), "rule_id": rule}
                    for e, rule in sorted(maps.policies().items(), key=lambda kv: (kv[0].dst_identity, kv[0].src_identity, kv[0].dport))]
        counters = maps.counters()
        histograms = maps.cost_histograms()
        cost = {}
        for program in ("connect", "sockops", "tc"):
            if counters.get(f"{program}_runs"):
                cost[program] = {"p50": round(histogram_quantile(histograms[program], 0.5)),
                                 "p99": round(histogram_quantile(histograms[program], 0.99)),
                                 "mean": round(counters[f"{program}_ns"] / counters[f"{program}_runs"]),
                                 "runs": counters[f"{program}_runs"]}
        return {"node": node, "cluster": layout.name, "pin_dir": str(pin_dir),
                "programs": _programs(pin_dir, layout.node_cgroup(node)), "enrolled_pods": pods,
                "identities": endpoints, "services": services, "policy_deny": policies,
                "counters": {k: v for k, v in counters.items() if not k.endswith(("_ns", "_runs"))},
                "capture_cost_ns": cost, "origdst_entries": maps.origdst_entries(),
                "proxy_cgroup": maps.proxy_cgroup()}
    finally:
        maps.close()


def _table(title: str, rows: list[dict]) -> list[str]:
    lines = [f"{title} ({len(rows)})"]
    if not rows:
        return lines + ["  -"]
    keys = list(rows[0])
    cells = [[str(row.get(k, "")) for k in keys] for row in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines.append("  " + "  ".join(k.upper().ljust(w) for k, w in zip(keys, widths)))
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return lines


def render(report: dict) -> str:
    lines = [f"node {report['node']} (cluster {report['cluster']}, pins {report['pin_dir']})", ""]
    for title, key in (("programs", "programs"), ("enrolled pods", "enrolled_pods"),
                       ("identities (ipcache)", "identities"), ("services", "services"),
                       ("L4 deny", "policy_deny")):
        lines += _table(title, report[key]) + [""]
    lines.append("counters")
    lines += [f"  {name:<24} {value}" for name, value in report["counters"].items()]
    lines.append(f"  {'origdst_entries':<24} {report['origdst_entries']}")
    lines.append(f"node proxy cgroup id: {report['proxy_cgroup'] or 'not known yet (its sockets would be captured)'}")
    lines.append("in-kernel cost per run (ns, p50 / p99 / mean over runs):")
    lines += [f"  {program:<10} {c['p50']} / {c['p99']} / {c['mean']}  ({c['runs']} runs)"
              for program, c in report["capture_cost_ns"].items()] or ["  no runs yet"]
    return "\n".join(lines)


@click.group("debug")
def debug() -> None:
    """Inspect Shoal internals."""


@debug.command("bpf")
@click.option("--node", required=True, help="node name, e.g. node-1")
@click.option("--cluster", default=None, help="cluster name (default: shoal's --cluster / SHOAL_CLUSTER)")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def bpf(ctx: click.Context, node: str, cluster: str | None, output: str) -> None:
    """Programs, maps (identities, services, policies, enrolled pods) and counters of NODE."""
    try:
        ClusterLayout.node_index(node)
    except (IndexError, ValueError):
        raise click.BadParameter(f"expected node-<n>, got {node!r}", param_hint="--node") from None
    if cluster is not None:
        layout = ClusterLayout(name=cluster)
    else:
        layout = ctx.find_object(ClusterLayout) or ClusterLayout.from_env()
    report = collect(layout, node)
    click.echo(json.dumps(report, indent=2) if output == "json" else render(report))
