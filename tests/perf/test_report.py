import json

import pytest

from shoal.perf import report
from shoal.perf.scenario import Measurement, Scenario, Target

STREAM = "pod2pod.tcp_stream"
RR = "pod2pod.tcp_rr_1k@1000/s"


def sample_measurements():
    return [
        Measurement(STREAM, "direct", "throughput", "Gbit/s", (20.0, 22.0, 24.0)),
        Measurement(STREAM, "stunnel", "throughput", "Gbit/s", (5.0, 5.5, 4.0)),
        Measurement(STREAM, "haproxy", "throughput", "Gbit/s", (6.0, 6.4, 6.6)),
        Measurement(RR, "direct", "p50", "µs", (60.0, 64.0, 70.0), "lower"),
        Measurement(RR, "stunnel", "p50", "µs", (140.0, 141.0, 150.0), "lower"),
        Measurement("controller.full_push[pods=5000]", "shoal", "seconds", "s", (1.2,), "lower"),
    ]


def rows_by_key(rows):
    return {(r["benchmark"], r["metric"], r["path"]): r for r in rows}


def test_rows_have_medians_and_ratios_to_direct():
    rows = rows_by_key(report.measurement_rows(sample_measurements()))
    direct = rows[(STREAM, "throughput", "direct")]
    assert direct["median"] == 22.0 and direct["ratio_to_direct"] is None
    stunnel = rows[(STREAM, "throughput", "stunnel")]
    assert stunnel["median"] == 5.0 and stunnel["ratio_to_direct"] == pytest.approx(5 / 22)
    assert stunnel["added_over_direct"] == pytest.approx(-17.0)
    assert (stunnel["min"], stunnel["max"], stunnel["n"]) == (4.0, 5.5, 3)
    latency = rows[(RR, "p50", "stunnel")]
    assert latency["added_over_direct"] == pytest.approx(77.0) and latency["better"] == "lower"
    lone = rows[("controller.full_push[pods=5000]", "seconds", "shoal")]
    assert lone["ratio_to_direct"] is None and lone["median"] == 1.2


def test_same_row_from_two_scenarios_pools_samples():
    rows = report.measurement_rows([Measurement("b", "direct", "m", "u", (1.0,)),
                                    Measurement("b", "direct", "m", "u", (3.0, 5.0))])
    assert len(rows) == 1 and rows[0]["n"] == 3 and rows[0]["median"] == 3.0


def test_targets_met_missed_and_not_measured():
    ms = sample_measurements()
    targets = {
        "ratio-met": Target(STREAM, "throughput", "haproxy", ">=", 1.2, kind="ratio", against="stunnel"),
        "ratio-missed": Target(STREAM, "throughput", "stunnel", ">=", 1.0, kind="ratio", against="haproxy"),
        "added-missed": Target(RR, "p50", "stunnel", "<=", 50, kind="added", against="direct"),
        "absolute-met": Target("controller.full_push[pods=5000]", "seconds", "shoal", "<=", 2.0),
        "absent": Target(STREAM, "throughput", "shoal-l4", ">=", 1.0, kind="ratio", against="haproxy"),
    }
    got = {name: report.evaluate_target(t, ms) for name, t in targets.items()}
    assert got["ratio-met"]["status"] == "met" and got["ratio-met"]["actual"] == pytest.approx(6.4 / 5.0)
    assert got["ratio-missed"]["status"] == "missed"
    assert got["added-missed"]["status"] == "missed" and got["added-missed"]["actual"] == pytest.approx(77.0)
    assert got["absolute-met"]["status"] == "met"
    assert got["absent"]["status"] == "not measured" and got["absent"]["actual"] is None


def test_markdown_and_files(tmp_path):
    run = report.RunReport(started="2026-01-01T00:00:00+00:00", finished="2026-01-01T00:01:00+00:00",
                           quick=True, bed="netns", host={"cpus": 2},
                           outcomes=[report.ScenarioOutcome("baseline", "t", "ok", 12.5),
                                     report.ScenarioOutcome("broken", "t", "failed", 0.1, "boom | bang")],
                           measurements=sample_measurements(),
                           targets=[Target(STREAM, "throughput", "haproxy", ">=", 1.0, kind="ratio",
                                           against="stunnel", label="haproxy beats stunnel")])
    doc = report.to_json(run)
    md = report.to_markdown(doc)
    assert "## pod2pod.tcp_stream" in md and "## controller.full_push[pods=5000]" in md
    assert "| throughput | stunnel | 5 | Gbit/s | 4 – 5.5 (3) | 0.227 | −17 |" in md
    assert "| haproxy beats stunnel | >= 1 × stunnel | 1.28 × | met |" in md
    assert "boom \\| bang" in md                                   # table stays a table
    json_path, md_path = report.write(doc, tmp_path, "20260101T000000Z")
    assert json.loads(json_path.read_text())["bed"] == "netns"
    assert (tmp_path / "latest.md").read_text() == md_path.read_text() == md
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("kwargs, message", [
    ({"samples": ()}, "at least one sample"),
    ({"samples": (float("nan"),)}, "finite"),
    ({"better": "faster"}, "better"),
])
def test_measurement_validation(kwargs, message):
    args = {"benchmark": "b", "path": "p", "metric": "m", "unit": "u", "samples": (1.0,), **kwargs}
    with pytest.raises(ValueError, match=message):
        Measurement(**args)


def test_target_and_scenario_validation():
    with pytest.raises(ValueError, match="against"):
        Target("b", "m", "p", ">=", 1.0, kind="ratio")
    with pytest.raises(ValueError, match="op"):
        Target("b", "m", "p", "==", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scenario name"):
        Scenario(name="has space", title="t", run=lambda ctx: [])


def test_markdown_leaves_out_ratio_columns_without_a_direct_path():
    doc = report.to_json(report.RunReport("s", "f", False, None, {}, measurements=[
        Measurement("controller.full_push[pods=5000]", "shoal", "seconds", "s", (1.25,), "lower")]))
    md = report.to_markdown(doc)
    assert "| seconds | shoal | 1.25 | s | 1.25 – 1.25 (1) |\n" in md and "× direct" not in md
