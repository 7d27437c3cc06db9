"""The run's report: one JSON document, and the same figures as a markdown table."""
from __future__ import annotations

import json
import operator
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shoal.perf import stats
from shoal.perf.scenario import PATH_DIRECT, Measurement, Target

_OPS = {"<=": operator.le, ">=": operator.ge}


@dataclass
class ScenarioOutcome:
    name: str
    title: str
    status: str                 # "ok" | "failed" | "skipped"
    seconds: float = 0.0
    reason: str = ""


@dataclass
class RunReport:
    started: str
    finished: str
    quick: bool
    bed: str | None
    host: dict[str, object]
    outcomes: list[ScenarioOutcome] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)


def _medians(measurements: Iterable[Measurement]) -> dict[tuple[str, str, str], Measurement]:
    table: dict[tuple[str, str, str], Measurement] = {}
    for m in measurements:
        key = (m.benchmark, m.metric, m.path)
        if key in table:
            # Two scenarios measured the same row: keep every sample, the median covers both.
            old = table[key]
            m = Measurement(m.benchmark, m.path, m.metric, m.unit, old.samples + m.samples, m.better,
                            "; ".join(n for n in (old.note, m.note) if n))
        table[key] = m
    return table


def measurement_rows(measurements: Sequence[Measurement]) -> list[dict[str, object]]:
    """Every (benchmark, metric, path) with its median and its ratio to the direct path."""
    table = _medians(measurements)
    rows = []
    for (benchmark, metric, path), m in table.items():
        direct = table.get((benchmark, metric, PATH_DIRECT))
        row: dict[str, object] = {
            "benchmark": benchmark, "metric": metric, "path": path, "unit": m.unit,
            "better": m.better, "median": m.median, "min": min(m.samples), "max": max(m.samples),
            "n": len(m.samples), "samples": list(m.samples), "spread": stats.spread(m.samples),
            "ratio_to_direct": None, "added_over_direct": None, "note": m.note,
        }
        if direct is not None and path != PATH_DIRECT:
            row["ratio_to_direct"] = stats.ratio(m.median, direct.median)
            row["added_over_direct"] = m.median - direct.median
        rows.append(row)
    return rows


def evaluate_target(target: Target, measurements: Sequence[Measurement]) -> dict[str, object]:
    table = _medians(measurements)
    subject = table.get((target.benchmark, target.metric, target.path))
    against = table.get((target.benchmark, target.metric, target.against)) if target.against else None
    result: dict[str, object] = {**asdict(target), "actual": None, "unit": "", "status": "not measured"}
    if subject is None or (target.against and against is None):
        return result
    result["unit"] = "×" if target.kind == "ratio" else subject.unit
    if target.kind == "ratio":
        actual = stats.ratio(subject.median, against.median)  # type: ignore[union-attr]
    elif target.kind == "added":
        actual = subject.median - against.median  # type: ignore[union-attr]
    else:
        actual = subject.median
    if actual is None:
        return result
    result["actual"] = actual
    result["status"] = "met" if _OPS[target.op](actual, target.value) else "missed"
    return result


def to_json(report: RunReport) -> dict[str, object]:
    return {
        "started": report.started, "finished": report.finished, "quick": report.quick,
        "bed": report.bed, "host": report.host,
        "scenarios": [asdict(o) for o in report.outcomes],
        "measurements": measurement_rows(report.measurements),
        "targets": [evaluate_target(t, report.measurements) for t in report.targets],
    }


def _num(value: object, digits: int = 3) -> str:
    if value is None:
        return "–"
    assert isinstance(value, (int, float))
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _signed(value: object) -> str:
    if value is None:
        return "–"
    assert isinstance(value, (int, float))
    return ("+" if value >= 0 else "−") + _num(abs(value))


def to_markdown(doc: dict[str, object]) -> str:
    lines = [f"# Shoal benchmark run {doc['started']}", "",
             f"bed: {doc['bed'] or 'none'} · quick: {doc['quick']} · host: "
             + ", ".join(f"{k} {v}" for k, v in dict(doc["host"]).items()),  # type: ignore[arg-type]
             "", "Medians of the repetitions; ratios and differences against the direct path "
             "of the same run.", ""]
    rows = doc["measurements"]
    assert isinstance(rows, list)
    benchmarks = list(dict.fromkeys(r["benchmark"] for r in rows))
    for benchmark in benchmarks:
        group = [r for r in rows if r["benchmark"] == benchmark]
        has_direct = any(r["path"] == PATH_DIRECT for r in group)
        lines += [f"## {benchmark}", ""]
        if has_direct:
            lines += ["| metric | path | median | unit | min – max (n) | × direct | vs direct |",
                      "|---|---|---:|---|---|---:|---:|"]
        else:
            lines += ["| metric | path | median | unit | min – max (n) |", "|---|---|---:|---|---|"]
        for r in group:
            line = (f"| {r['metric']} | {r['path']} | {_num(r['median'])} | {r['unit']} | "
                    f"{_num(r['min'])} – {_num(r['max'])} ({r['n']}) |")
            if has_direct:
                line += f" {_num(r['ratio_to_direct'])} | {_signed(r['added_over_direct'])} |"
            lines.append(line)
        lines.append("")
    targets = doc["targets"]
    assert isinstance(targets, list)
    if targets:
        lines += ["## Targets", "", "| target | goal | actual | status |", "|---|---|---:|---|"]
        for t in targets:
            what = t["label"] or _describe(t)
            goal = f"{t['op']} {_num(t['value'])}"
            if t["kind"] == "ratio":
                goal += f" × {t['against']}"
            elif t["kind"] == "added":
                goal += f" over {t['against']}"
            lines.append(f"| {what} | {goal} | {_num(t['actual'])} {t.get('unit', '')} | {t['status']} |")
        lines.append("")
    lines += ["## Scenarios", "", "| scenario | status | seconds | reason |", "|---|---|---:|---|"]
    for o in doc["scenarios"]:  # type: ignore[union-attr]
        reason = str(o["reason"]).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {o['name']} | {o['status']} | {o['seconds']:.1f} | {reason} |")
    return "\n".join(lines) + "\n"


def _describe(t: dict[str, object]) -> str:
    base = f"{t['benchmark']} {t['metric']} {t['path']}"
    if t["kind"] == "ratio":
        return f"{base} / {t['against']} {t['op']} {t['value']}"
    if t["kind"] == "added":
        return f"{base} − {t['against']} {t['op']} {t['value']}"
    return f"{base} {t['op']} {t['value']}"


def write(doc: dict[str, object], directory: Path, stamp: str) -> tuple[Path, Path]:
    """Write ``<stamp>.json`` and ``<stamp>.md`` and refresh ``latest.*``; return both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=2) + "\n"
    md = to_markdown(doc)
    json_path, md_path = directory / f"{stamp}.json", directory / f"{stamp}.md"
    for path, content in ((json_path, text), (md_path, md),
                          (directory / "latest.json", text), (directory / "latest.md", md)):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(content)
        tmp.replace(path)
    return json_path, md_path
