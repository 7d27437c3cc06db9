"""``shoal observe`` and ``shoal list nodes`` (Hubble's flags and formats), against the relay."""
from __future__ import annotations

import sys

import click
import grpc

from shoal.cli.observe.client import ObserverClient, ObserverUnreachable, connection, tls_options
from shoal.cli.observe.printers import OUTPUTS, Printer
from shoal.cli.observe.request import FilterFlags, Selection, build_request
from shoal.config import ClusterLayout
from shoal.flows.filters import FilterError

# (long flag, short flag, help). Every endpoint flag also has --from-/--to- forms.
ENDPOINT_FLAGS = (
    ("pod", None, "pod name prefix, 'namespace/name' or 'namespace/'"),
    ("ip", None, "IP address or CIDR"),
    ("label", "-l", "label selector, e.g. app=web or 'tier in (a,b)'"),
    ("port", None, "L4 port"),
    ("service", None, "service name, 'namespace/name'"),
    ("identity", None, "numeric security identity"),
    ("fqdn", None, "DNS name pattern"),
    ("workload", None, "workload name, 'kind/name'"),
)
PLAIN_FLAGS = (
    ("verdict", None, "FORWARDED, DROPPED, REDIRECTED, ERROR, AUDIT, TRACED, TRANSLATED"),
    ("protocol", None, "tcp, udp, icmp, http, dns..."),
    ("type", "-t", "event type: trace, drop, l7, policy-verdict, trace-sock (optionally type:subtype)"),
    ("http-status", None, "HTTP status code, or prefix like 5+"),
    ("http-method", None, "HTTP method"),
    ("http-path", None, "HTTP path regular expression"),
    ("node-name", None, "node name pattern, e.g. node-*"),
    ("traffic-direction", None, "ingress or egress"),
    ("tcp-flags", None, "comma-separated TCP flags that must all be set, e.g. SYN,ACK"),
    ("ip-version", None, "v4 or v6"),
    ("uuid", None, "flow UUID"),
    ("trace-id", None, "trace ID"),
)


def _filter_flag_names() -> list[tuple[str, str | None, str]]:
    flags = [("namespace", "-n", "Kubernetes namespace (either side)"),
             ("from-namespace", None, "source namespace"), ("to-namespace", None, "destination namespace")]
    for name, short, doc in ENDPOINT_FLAGS:
        flags.append((name, short, f"{doc} (either side)"))
        flags.append((f"from-{name}", None, f"source {doc}"))
        flags.append((f"to-{name}", None, f"destination {doc}"))
    flags.extend(PLAIN_FLAGS)
    return flags


FILTER_FLAGS = _filter_flag_names()
SHORT_TO_LONG = {short: long for long, short, _ in FILTER_FLAGS if short}


class ObserveCommand(click.Command):
    """Rewrites ``--not --pod x`` into the hidden ``--not-pod x`` before click parses."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rewritten, negate = [], False
        for arg in args:
            if arg == "--not":
                if negate:
                    raise click.UsageError("--not must be followed by a filter flag, not another --not")
                negate = True
                continue
            if negate:
                name, eq, value = arg.partition("=")
                long = SHORT_TO_LONG.get(name, name[2:] if name.startswith("--") else None)
                if long not in {flag for flag, _, _ in FILTER_FLAGS}:
                    raise click.UsageError(f"--not must be followed by a filter flag, got {arg!r}")
                arg = f"--not-{long}{eq}{value}"
                negate = False
            rewritten.append(arg)
        if negate:
            raise click.UsageError("--not must be followed by a filter flag")
        return super().parse_args(ctx, rewritten)


def _filter_options(func):
    for long, short, doc in reversed(FILTER_FLAGS):
        key = long.replace("-", "_")
        decls = [f"--{long}", key] + ([short] if short else [])
        func = click.option(*decls, multiple=True, help=doc)(func)
        func = click.option(f"--not-{long}", f"not_{key}", multiple=True, hidden=True)(func)
    return func


def _layout(ctx: click.Context) -> ClusterLayout:
    return ctx.find_object(ClusterLayout) or ClusterLayout.from_env()


@click.command("observe", cls=ObserveCommand,
               help="Observe flows of the whole cluster through the relay, like `hubble observe`.\n\n"
                    "Flags of the same filter are ANDed, repeated values ORed; --not negates the next filter "
                    "flag (e.g. --not --verdict FORWARDED).")
@click.option("--last", type=int, help="Get the last N flows, in total across nodes (default 20); "
                                       "with --since/--until, the last N of that window.")
@click.option("--first", type=int, help="Get the first N flows, in total across nodes.")
@click.option("--all", "all_", is_flag=True, help="Get every flow stored.")
@click.option("-f", "--follow", is_flag=True, help="Keep streaming new flows.")
@click.option("--since", help="Flows since this time: a duration ago (5m, 1h30m) or RFC 3339.")
@click.option("--until", help="Flows until this time: a duration ago or RFC 3339.")
@click.option("-o", "--output", type=click.Choice(OUTPUTS), default="compact", show_default=True)
@click.option("--server", help="Observer address: host:port (mTLS), unix:/path (default: this cluster's relay socket).")
@tls_options
@_filter_options
@click.pass_context
def observe(ctx: click.Context, last, first, all_, follow, since, until, output, server, insecure,
            tls_ca, tls_cert, tls_key, tls_server_name, **filters) -> None:
    allow, deny = FilterFlags(), FilterFlags()
    try:
        for key, values in filters.items():
            target, flag = (deny, key[4:]) if key.startswith("not_") else (allow, key)
            for value in values:
                target.add(flag.replace("_", "-"), value)
        request = build_request(Selection(last, first, all_, follow, since, until), allow, deny)
    except FilterError as error:
        raise click.UsageError(str(error)) from None
    client = ObserverClient(connection(_layout(ctx), server, tls_ca, tls_cert, tls_key, tls_server_name, insecure))
    printer = Printer(output, sys.stdout, sys.stderr)
    try:
        for response in client.flows(request):
            printer.write(response)
    except KeyboardInterrupt:
        pass
    except ObserverUnreachable as error:
        raise click.ClickException(str(error)) from None
    except grpc.RpcError as error:
        raise click.ClickException(f"{error.code().name}: {error.details()}") from None
    finally:
        printer.close()
        client.close()


@click.group("list", help="List cluster objects seen by the flow relay.")
def list_cmd() -> None:
    pass


def _duration(ns: int) -> str:
    seconds = ns // 1_000_000_000
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "") + f"{secs}s"


@list_cmd.command("nodes", help="Nodes known to the relay and their flow stores, like `hubble list nodes`.")
@click.option("-o", "--output", type=click.Choice(("table", "json")), default="table", show_default=True)
@click.option("--server", help="Observer address (default: this cluster's relay socket).")
@tls_options
@click.pass_context
def list_nodes(ctx: click.Context, output: str, server: str | None, **tls) -> None:
    from shoal.api.observer import relay_pb2
    from shoal.cli.observe.printers import to_json

    client = ObserverClient(connection(_layout(ctx), server, **tls))
    try:
        nodes = client.nodes().nodes
    except ObserverUnreachable as error:
        raise click.ClickException(str(error)) from None
    except grpc.RpcError as error:
        raise click.ClickException(f"{error.code().name}: {error.details()}") from None
    finally:
        client.close()
    if output == "json":
        for node in nodes:
            click.echo(to_json(node))
        return
    states = {relay_pb2.NODE_CONNECTED: "Connected", relay_pb2.NODE_UNAVAILABLE: "Unavailable",
              relay_pb2.NODE_GONE: "Gone", relay_pb2.NODE_ERROR: "Error"}
    rows = [("NAME", "STATUS", "AGE", "FLOWS/S", "CURRENT/MAX-FLOWS")]
    for node in nodes:
        if node.state == relay_pb2.NODE_CONNECTED:
            rate = node.seen_flows / (node.uptime_ns / 1e9) if node.uptime_ns else 0.0
            share = 100.0 * node.num_flows / node.max_flows if node.max_flows else 0.0
            rows.append((node.name, states[node.state], _duration(node.uptime_ns), f"{rate:.2f}",
                         f"{node.num_flows}/{node.max_flows} ({share:6.2f}%)"))
        else:
            rows.append((node.name, states.get(node.state, "Unknown"), "N/A", "N/A", "N/A"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("".join(cell.ljust(w + 3) for cell, w in zip(row, widths)) + row[-1])


@list_cmd.command("namespaces", help="Namespaces seen in the stored flows, like `hubble list namespaces`.")
@click.option("--server", help="Observer address (default: this cluster's relay socket).")
@tls_options
@click.pass_context
def list_namespaces(ctx: click.Context, server: str | None, **tls) -> None:
    client = ObserverClient(connection(_layout(ctx), server, **tls))
    try:
        namespaces = client.namespaces().namespaces
    except ObserverUnreachable as error:
        raise click.ClickException(str(error)) from None
    except grpc.RpcError as error:
        raise click.ClickException(f"{error.code().name}: {error.details()}") from None
    finally:
        client.close()
    rows = [("CLUSTER", "NAMESPACE")] + [(ns.cluster or "-", ns.namespace) for ns in namespaces]
    width = max(len(row[0]) for row in rows)
    for cluster, name in rows:
        click.echo(f"{cluster.ljust(width + 3)}{name}")
