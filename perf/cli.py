"""``python -m shoal.perf run [--quick] [--json] [--only NAME]``."""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

from shoal.perf import harness


@click.group()
def perf() -> None:
    """Shoal benchmarks: scenarios side by side, medians and ratios against the direct path."""


@perf.command("run")
@click.option("--quick", is_flag=True, help="Short runs, 3 repetitions (about 1-2 minutes).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout.")
@click.option("--only", multiple=True, metavar="NAME", help="Run only this scenario (repeatable).")
@click.option("--bed", type=click.Choice(harness.BED_KINDS), default="auto", show_default=True,
              help="cluster: SHOAL_CLUSTER=perf shoal up; netns: throwaway namespaces, peers only.")
@click.option("--repeat", type=click.IntRange(1, 50), default=None,
              help="Repetitions of each figure (default 3 with --quick, else 5).")
@click.option("--results", type=click.Path(file_okay=False, path_type=Path), default=harness.RESULTS_DIR,
              show_default=True, help="Where the JSON and markdown reports go.")
def run_cmd(quick: bool, as_json: bool, only: tuple[str, ...], bed: str, repeat: int | None,
            results: Path) -> None:
    """Run the scenarios and write perf/results/<time>.json and .md."""
    try:
        doc, (json_path, md_path) = harness.run(only=only, quick=quick, bed=bed, results_dir=results,
                                                repetitions=repeat, enforce_timeouts=True)
    except harness.SelectionError as exc:
        raise click.UsageError(str(exc)) from exc
    except harness.BusyError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(md_path.read_text())
    click.echo(f"report: {json_path} {md_path}", err=True)
    if any(o["status"] == "failed" for o in doc["scenarios"]):  # type: ignore[union-attr]
        sys.exit(1)


@perf.command("list")
def list_cmd() -> None:
    """List the scenarios the harness found."""
    found = harness.discover()
    for s in found.scenarios:
        click.echo(f"{s.name:20} order {s.order:3}  {s.title}")
    for name, error in found.broken:
        click.echo(f"{name:20} BROKEN     {error}")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds through the harness's finally blocks: the bed (and the perf
    # cluster) is removed even when the run is stopped.
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    perf(prog_name="python -m shoal.perf")
