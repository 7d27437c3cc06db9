"""Process CPU and memory sampling from /proc and cgroups."""
import os
import time

import pytest

from shoal.perf import procstat


def test_stat_line_with_spaces_and_parens_in_comm():
    line = "4242 (python3 (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 1000 0 0"
    assert procstat.parse_stat_cpu_ticks(line) == 325
    with pytest.raises(ValueError):
        procstat.parse_stat_cpu_ticks("4242 python3 S 1")
    with pytest.raises(ValueError):
        procstat.parse_stat_cpu_ticks("4242 (x) S 1 2 3")



def test_status_rss():
    assert procstat.parse_status_rss_kib("Name:\tx\nVmRSS:\t   20480 kB\nThreads: 1\n") == 20480
    assert procstat.parse_status_rss_kib("Name:\tkthreadd\n") == 0
    with pytest.raises(ValueError):
        procstat.parse_status_rss_kib("VmRSS:\n")



def test_a_process_cpu_is_its_user_and_system_time():
    start = procstat.cpu_seconds(os.getpid())
    busy_until = time.process_time() + 0.2
    while time.process_time() < busy_until:
        pass
    assert procstat.cpu_seconds(os.getpid()) - start >= 0.1    # clock ticks: 10 ms steps


def test_sampler_measures_this_process_burning_cpu():
    # What the process itself counts is the reference: on a shared machine a busy thread
    # may get far less than a core, so no absolute share is asserted.
    cpu_before = time.process_time()
    with procstat.ProcessSampler([os.getpid()], interval=0.05) as sampler:
        total = 0
        for i in range(3_000_000):  # busy for a few hundred ms of CPU
            total += i
    own_cpu = time.process_time() - cpu_before
    usage = sampler.usage
    assert usage is not None and usage.seconds > 0
    assert usage.cpu_cores > 0
    assert abs(usage.cpu_cores * usage.seconds - own_cpu) < 0.05 + 0.2 * own_cpu   # clock ticks are 10 ms
    assert usage.rss_peak_mb >= usage.rss_mean_mb > 1
    assert set(sampler.rss_peak_per_process_mb) == {os.getpid()} == set(sampler.latest_rss_mb)
    assert sampler.rss_peak_per_process_mb[os.getpid()] == usage.rss_peak_mb
    timeline = sampler.rss_timeline_mb[os.getpid()]    # per process, timed: for a growth fit
    assert [mb for _, mb in timeline] == list(sampler.rss_samples_mb)
    times = [t for t, _ in timeline]
    assert times == sorted(times) and 0 <= times[0] < 0.05 and times[-1] <= usage.seconds + 0.01



def test_sampler_needs_pids_and_reads_cgroups(tmp_path):
    with pytest.raises(ValueError):
        procstat.ProcessSampler([])
    (tmp_path / "a").mkdir()
    (tmp_path / "cgroup.procs").write_text("10\n11\n")
    (tmp_path / "a" / "cgroup.procs").write_text("12\n")
    assert procstat.pids_in_cgroup(tmp_path) == [10, 11, 12]



def test_pgid_and_comm_from_stat_line():
    line = "4242 (my (odd) tool) S 1 4240 4240 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 1000 0 0"
    assert procstat.parse_stat_pgid_comm(line) == (4240, "my (odd) tool", "S")
    with pytest.raises(ValueError):
        procstat.parse_stat_pgid_comm("garbage")



def test_pids_in_group_finds_the_tool_under_its_wrapper():
    from shoal.perf.beds import procs
    proc = procs.spawn(["sh", "-c", "sleep 30 & sleep 30 & wait"], log=None)
    try:
        deadline = time.monotonic() + 5
        while len(found := procstat.pids_in_group(proc.pid, "sleep")) < 2:
            assert time.monotonic() < deadline, found
        assert proc.pid not in found
        assert proc.pid in procstat.pids_in_group(proc.pid)
    finally:
        procs.stop(proc)
    assert proc.poll() is not None and procstat.pids_in_group(proc.pid) == []


def test_a_parent_of_another_measured_process_is_a_supervisor():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        me = os.getpid()
        assert procstat.parent_pid(child.pid) == me
        assert procstat.split_supervisors([me, child.pid]) == ([child.pid], [me])
        assert procstat.split_supervisors([child.pid]) == ([child.pid], [])   # a single process
        assert procstat.split_supervisors([child.pid, 2 ** 22 + 17]) == ([child.pid], [])   # gone: left out
        # A node proxy in all: the supervisor with its workers; a lone process alone.
        assert procstat.totals_per_supervisor({me: 60.0, child.pid: 38.0}, [me]) == {me: 98.0}
        assert procstat.totals_per_supervisor({child.pid: 67.0}, []) == {child.pid: 67.0}
    finally:
        child.kill()
        child.wait()
