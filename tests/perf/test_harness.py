"""The harness's plumbing, on a fake scenario package (no benchmark runs)."""
import json
import os
import sys
import textwrap
import uuid

import pytest

from shoal.perf import harness
from shoal.perf.scenario import Scenario

MODULES = {
    "good": """
        from shoal.perf.scenario import Measurement, Scenario, Target
        def run(ctx):
            assert ctx.quick and ctx.repetitions == 3 and ctx.workdir.is_dir()
            assert ctx.seconds(10, 1) == 1
            yield Measurement("w", "direct", "rate", "op/s", (10.0, 12.0, 11.0))
            yield Measurement("w", "fast", "rate", "op/s", (22.0, 21.0, 23.0))
        SCENARIO = Scenario("good", "a good one", run, order=1,
                            targets=(Target("w", "rate", "fast", ">=", 2.0, kind="ratio", against="direct"),))
    """,
    "halfway": """
        from shoal.perf.scenario import Measurement, Scenario
        def run(ctx):
            yield Measurement("h", "direct", "x", "u", (1.0,))
            raise RuntimeError("tool crashed")
        SCENARIO = Scenario("halfway", "fails after one figure", run, order=2)
    """,
    "needy": """
        from shoal.perf.scenario import Scenario
        def run(ctx):
            raise AssertionError("must not run")
        SCENARIO = Scenario("needy", "needs things", run, requires=("bin:shoal-no-such-tool", "cluster"))
    """,
    "wrongtype": """
        from shoal.perf.scenario import Scenario
        CLEANED = []
        def run(ctx):
            try:
                yield "not a measurement"
            finally:
                CLEANED.append(True)
        SCENARIO = Scenario("wrongtype", "yields junk", run, order=3)
    """,
    "broken": "import shoal.perf.no_such_module\n",
    "nothing": "X = 1\n",
    "_private": "raise SystemExit('not imported')\n",
}


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    name = f"shoal_perf_fake_{uuid.uuid4().hex[:8]}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for module, source in MODULES.items():
        (pkg / f"{module}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for mod in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[mod]


def test_discover_orders_and_reports_broken_modules(fake_package):
    found = harness.discover(fake_package)
    assert [s.name for s in found.scenarios] == ["good", "halfway", "wrongtype", "needy"]
    broken = dict(found.broken)
    assert set(broken) == {"broken", "nothing"}
    assert "no_such_module" in broken["broken"] and "SCENARIO" in broken["nothing"]


def test_select_rejects_unknown_names(fake_package):
    scenarios = harness.discover(fake_package).scenarios
    assert [s.name for s in harness.select(scenarios, ["needy"])] == ["needy"]
    with pytest.raises(harness.SelectionError, match="nope.*known: good"):
        harness.select(scenarios, ["nope"])


def test_requirements():
    s = Scenario("x", "t", lambda ctx: [], requires=("root", "cluster", "bin:iperf3", "gpu"))
    missing = harness.unmet_requirements(s, "netns", is_root=False, which=lambda exe: None)
    assert missing == ["needs root", "needs the Shoal cluster bed (this run uses netns)",
                       "iperf3 is not installed", "unknown requirement 'gpu'"]
    ok = Scenario("y", "t", lambda ctx: [], requires=("root", "cluster", "bin:iperf3"))
    assert harness.unmet_requirements(ok, "cluster", is_root=True, which=lambda exe: "/usr/bin/" + exe) == []


def test_run_collects_figures_failures_and_skips(fake_package, tmp_path):
    lines = []
    doc, (json_path, md_path) = harness.run(quick=True, bed="netns", results_dir=tmp_path / "out",
                                            log=lines.append, package=fake_package, lock=tmp_path / "lock")
    status = {o["name"]: o["status"] for o in doc["scenarios"]}
    assert status == {"broken": "failed", "nothing": "failed", "good": "ok", "halfway": "failed",
                      "wrongtype": "failed", "needy": "skipped"}
    reasons = {o["name"]: o["reason"] for o in doc["scenarios"]}
    assert "not a Measurement" in reasons["wrongtype"]
    assert sys.modules[f"{fake_package}.wrongtype"].CLEANED == [True]   # its finally ran at once
    assert "tool crashed" in reasons["halfway"] and "shoal-no-such-tool" in reasons["needy"]
    rows = {(r["benchmark"], r["path"]): r for r in doc["measurements"]}
    assert rows[("w", "fast")]["ratio_to_direct"] == pytest.approx(2.0)
    assert ("h", "direct") in rows                       # kept although the scenario failed later
    assert doc["targets"][0]["status"] == "met"
    assert doc["bed"] is None                            # nobody touched ctx.bed: none was made
    assert json.loads(json_path.read_text()) == doc and md_path.exists()
    assert any("tool crashed" in line for line in lines)


def test_run_only(fake_package, tmp_path):
    doc, _ = harness.run(only=["good"], quick=True, bed="netns", results_dir=tmp_path, log=lambda m: None,
                         package=fake_package, lock=None)
    assert [o["name"] for o in doc["scenarios"]] == ["good"]
    doc, _ = harness.run(only=["good"], quick=True, bed="netns", results_dir=tmp_path, log=lambda m: None,
                         package=fake_package, lock=None, repetitions=4)
    assert doc["scenarios"][0]["status"] == "failed"      # the fake asserts 3 repetitions


def test_real_scenarios_load():
    found = harness.discover()
    assert not found.broken, found.broken
    assert "baseline" in {s.name for s in found.scenarios}


def test_cli_rejects_unknown_scenario():
    from click.testing import CliRunner

    from shoal.perf.cli import perf
    result = CliRunner().invoke(perf, ["run", "--only", "no-such-scenario", "--bed", "netns"])
    assert result.exit_code == 2 and "unknown scenario" in result.output


def test_one_run_at_a_time(tmp_path):
    lock, lines = tmp_path / "run" / "bench.lock", []
    with harness.exclusive_run(lock, lines.append):
        assert lock.read_text() == str(os.getpid())
        with pytest.raises(harness.BusyError, match=f"pid {os.getpid()}"):
            with harness.exclusive_run(lock, lines.append, wait=0.3):
                pass
    assert any("waiting for another benchmark run" in line for line in lines)
    with harness.exclusive_run(lock, lines.append, wait=0):   # free again once released
        pass


def test_a_bed_that_failed_is_not_made_again(tmp_path, monkeypatch):
    calls = []

    def failing_bed(kind, log, fallback=False):
        calls.append(kind)
        raise RuntimeError("shoal up failed")
    monkeypatch.setattr(harness, "make_bed", failing_bed)
    failures: dict = {}
    contexts = [harness.RunContext(quick=True, workdir=tmp_path, bed_kind="cluster", _bed_holder={},
                                   _bed_failure=failures) for _ in range(2)]
    for ctx in contexts:
        with pytest.raises(RuntimeError, match="shoal up failed"):
            _ = ctx.bed
    assert calls == ["cluster"]


def test_time_limit_interrupts_and_restores_the_outer_alarm():
    import signal
    import time

    from shoal.perf.scenario import ScenarioTimeout
    outer = signal.getitimer(signal.ITIMER_REAL)[0]
    began = time.monotonic()
    with pytest.raises(ScenarioTimeout, match="slow ran past"):
        with harness.time_limit(0.2, "slow"):
            time.sleep(5)
    assert time.monotonic() - began < 2
    if outer:                                   # pytest-timeout's alarm is armed again
        assert 0 < signal.getitimer(signal.ITIMER_REAL)[0] <= outer
    with harness.time_limit(None, "off"):
        pass


def test_scenario_time_limits():
    s = Scenario("x", "t", lambda ctx: [], timeout=600)
    assert s.time_limit(quick=False) == 600 and s.time_limit(quick=True) == 200
    assert Scenario("y", "t", lambda ctx: [], timeout=90).time_limit(quick=True) == 60


def test_told_seconds_are_added_whole_and_read_when_asked():
    told = {"seconds": 60.0}
    s = Scenario("soak", "t", lambda ctx: [], timeout=1800, told_seconds=lambda quick: told["seconds"])
    told["seconds"] = 3600.0   # set after the module was imported, as an env variable is
    assert s.time_limit(quick=True) == 600 + 3600 and s.time_limit(quick=False) == 1800 + 3600
    with pytest.raises(ValueError, match="timeout"):
        Scenario("z", "t", lambda ctx: [], timeout=0)
