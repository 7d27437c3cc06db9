"""Hubble's observe flags -> GetFlowsRequest (pure)."""
import datetime as dt

import pytest

from shoal.api.flow import flow_pb2 as F
from shoal.cli.observe.request import FilterFlags, Selection, build_request, parse_time
from shoal.flows.filters import FilterError
from shoal.flows.query import NUMBER_ALL

NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)


def flags(*pairs):
    result = FilterFlags()
    for flag, value in pairs:
        result.add(flag, value)
    return result


def request(selection=None, allow=(), deny=()):
    return build_request(selection or Selection(), flags(*allow), flags(*deny), now=NOW)


def test_selection_defaults_and_limits():
    assert request().number == 20 and not request().follow
    assert request(Selection(last=5)).number == 5
    first = request(Selection(first=3))
    assert (first.number, first.first) == (3, True)
    assert request(Selection(all=True)).number == NUMBER_ALL
    follow = request(Selection(follow=True))
    assert (follow.number, follow.follow) == (0, True)
    since = request(Selection(since="5m"))
    assert since.number == 0 and since.since.ToDatetime(tzinfo=dt.timezone.utc) == NOW - dt.timedelta(minutes=5)
    last_since = request(Selection(last=5, since="1m"))      # Hubble: the last 5 of the last minute
    assert last_since.number == 5 and last_since.HasField("since")


@pytest.mark.parametrize("selection, message", [
    (Selection(first=5, follow=True), "--follow"),
    (Selection(last=5, all=True), "cannot be combined"),
    (Selection(last=0), "at least 1"),
    (Selection(since="yesterday"), "invalid time"),
    (Selection(since="1m", until="5m"), "after --until"),
])
def test_bad_selection(selection, message):
    with pytest.raises(FilterError, match=message):
        request(selection)


def test_time_forms():
    assert parse_time("1h30m", NOW) == NOW - dt.timedelta(minutes=90)
    assert parse_time("2026-01-01T00:00:00Z", NOW) == dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def test_undirected_flag_makes_two_filters_sharing_the_rest():
    got = request(allow=[("namespace", "demo"), ("verdict", "dropped")])
    assert [list(f.source_pod) for f in got.whitelist] == [["demo/"], []]
    assert [list(f.destination_pod) for f in got.whitelist] == [[], ["demo/"]]
    assert all(list(f.verdict) == [F.DROPPED] for f in got.whitelist)


def test_namespace_qualifies_pods_and_directional_flags_stay_in_one_filter():
    got = request(allow=[("namespace", "demo"), ("from-pod", "client"), ("to-port", "8080")])
    assert len(got.whitelist) == 1
    only = got.whitelist[0]
    assert list(only.source_pod) == ["demo/client"] and list(only.destination_port) == ["8080"]
    both = request(allow=[("namespace", "demo"), ("pod", "web")])
    assert [list(f.source_pod) + list(f.destination_pod) for f in both.whitelist] == [["demo/web"], ["demo/web"]]


def test_not_goes_to_blacklist():
    got = request(allow=[("to-namespace", "demo")], deny=[("verdict", "FORWARDED")])
    assert list(got.whitelist[0].destination_pod) == ["demo/"]
    assert list(got.blacklist[0].verdict) == [F.FORWARDED]


def test_types_status_and_validation():
    got = request(allow=[("type", "l7"), ("type", "trace:to-endpoint"), ("http-status", "5+")])
    events = [(e.type, e.match_sub_type, e.sub_type) for e in got.whitelist[0].event_type]
    assert events == [(129, False, 0), (4, True, 0)]
    for pair, message in ((("verdict", "maybe"), "unknown verdict"), (("type", "nope"), "event type"),
                          (("http-status", "5xx"), "status code"), (("ip", "1.2.3.4/99"), "CIDR"),
                          (("identity", "web"), "not a number"), (("protocol", "gopher"), "protocol")):
        with pytest.raises(FilterError, match=message):
            request(allow=[pair])
