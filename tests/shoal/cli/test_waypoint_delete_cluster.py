"""``shoal waypoint delete`` restores L4 (issue 18 item 6), on the real local cluster.

Before: the Gateway went, the namespace's ``shoal.io/use-waypoint`` label stayed, and every
request to the namespace's services was refused ("waypoint demo/waypoint unknown"). Now the
delete removes the label first and waits for the nodes; requests sampled during the whole
delete, each on a new connection, all succeed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import eventually, pod_exec, shoal_cli

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

SAMPLER = textwrap.dedent("""
    import collections, http.client, json, sys, time
    host, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    statuses, deadline = collections.Counter(), time.monotonic() + seconds
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(host, port, timeout=5)   # a new connection each time
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            statuses[str(response.status)] += 1
        except (OSError, http.client.HTTPException) as err:
            statuses[type(err).__name__] += 1
        finally:
            conn.close()
        time.sleep(0.02)
    print(json.dumps(statuses))
""")


def namespace_labels(layout) -> dict:
    namespaces = json.loads(shoal_cli(layout, "get", "namespaces", "-o", "json").stdout)["items"]
    return next(n for n in namespaces if n["metadata"]["name"] == "demo")["metadata"].get("labels") or {}


def waypoint_requests(layout) -> int:
    return shoal_cli(layout, "logs", "demo/waypoint-0", "--tail", "1000000",
                     check=False).stdout.count('"response_code"')


def sample(layout, seconds: float) -> dict:
    out = pod_exec(layout, "demo/client-0", sys.executable, "-c", SAMPLER, "web.demo", "8080",
                   str(seconds), timeout=seconds + 60).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_waypoint_delete_removes_the_enrolment_and_no_request_is_refused(demo_cluster):
    layout = demo_cluster.layout
    shoal_cli(layout, "waypoint", "apply", "-n", "demo", "--enroll-namespace")
    try:
        assert namespace_labels(layout).get("shoal.io/use-waypoint") == "waypoint"
        eventually(lambda: sample(layout, 1).get("200") and waypoint_requests(layout) > 0,
                   "requests through the waypoint", timeout=90, interval=0.5)
        delete_refusing_nothing(layout)
    finally:
        shoal_cli(layout, "waypoint", "delete", "-n", "demo", "--wait", "60", check=False, timeout=120)


def delete_refusing_nothing(layout) -> None:
    """`shoal waypoint delete -n demo` while demo/client-0 samples web.demo, each request on a
    new connection: every one answers 200, and afterwards traffic takes the L4 path."""
    sampler = subprocess.Popen(
        [sys.executable, "-m", "shoal", "exec", "demo/client-0", "--", sys.executable,
         "-c", SAMPLER, "web.demo", "8080", "12"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "SHOAL_CLUSTER": layout.name})
    try:
        # --wait: the pod drains after its Gateway goes; the next test must not find it.
        deleted = shoal_cli(layout, "waypoint", "delete", "-n", "demo", "--wait", "60", timeout=120)
        out, err = sampler.communicate(timeout=90)
    finally:
        if sampler.poll() is None:
            sampler.kill()
            sampler.wait()
    statuses = json.loads(out.strip().splitlines()[-1])
    assert "label removed" in deleted.stdout, deleted.stdout + deleted.stderr
    assert set(statuses) == {"200"} and statuses["200"] > 50, (statuses, err)
    assert "shoal.io/use-waypoint" not in namespace_labels(layout)
    # Afterwards: the L4 path, the waypoint's pod gone.
    eventually(lambda: "no waypoints" in shoal_cli(layout, "waypoint", "list").stderr,
               "the waypoint to go", timeout=30, interval=0.5)
    assert sample(layout, 1).keys() == {"200"}


def test_waypoint_delete_right_after_its_pod_runs_does_not_wait_the_settle_timeout(demo_cluster):
    """Deleted as soon as its pod runs, before its Gateway is bound: nothing used the
    waypoint yet, so removing the namespace's label changed no node's config and moved no
    version. The delete waited for the version to move, i.e. its whole settle timeout
    (15 s, with a warning); now it waits for the controller to have taken the write."""
    layout = demo_cluster.layout
    shoal_cli(layout, "waypoint", "apply", "-n", "demo", "--enroll-namespace")
    try:
        eventually(lambda: any(p["metadata"]["name"].startswith("waypoint")
                               for p in json.loads(shoal_cli(layout, "get", "pods", "-n", "demo", "-o", "json").stdout)["items"]),
                   "the waypoint's pod", timeout=30, interval=0.1)
        started = time.monotonic()
        deleted = shoal_cli(layout, "waypoint", "delete", "-n", "demo", "--settle-timeout", "15", timeout=60)
        elapsed = time.monotonic() - started
        assert "not every node confirmed" not in deleted.stderr, deleted.stderr
        assert elapsed < 12, f"delete took {elapsed:.1f} s"
    finally:
        shoal_cli(layout, "waypoint", "delete", "-n", "demo", "--wait", "60", check=False, timeout=120)
