"""The Prometheus exposition of the shared-memory counters (fastgw/admin/metrics.py): a segment
filled through the data plane's recorders, rendered, and read back by prometheus_client's parser."""
from __future__ import annotations

import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastgw._core import health, shm
from fastgw._core.shm import BUCKETS, Segment
from fastgw.admin.metrics import render

ODD = 'we\\ird "route"\nname'             # backslash, quotes and a newline in a label value
LABELS = {
    "routes": [(1, "users", "users-svc"), (2, ODD, ""), (3, "idle", "users-svc")],
    "targets": [(0, "users-svc", "10.0.0.1:80"), (1, "users-svc", "10.0.0.2:80")],
    "listeners": [(0, "public"), (1, "internal")],
    "config_version": 7,
    "reloads": {"ok": 3, "error": 1},
    "build": {"version": "0.1.0", "python": "3.11.7", "uvloop": "0.19.0", "core": "compiled"},
    "workers": 4,
}


def _set_circuit(seg: Segment, slot: int, state: int) -> None:
    """Write a target's circuit word through the fd (the breaker issue will own this word).
    Header word 11 holds the targets' offset in words; a target slot is 48 words; circuit is word 3."""
    off_targets = int.from_bytes(os.pread(seg.fd, 8, 11 * 8), "little")
    os.pwrite(seg.fd, state.to_bytes(8, "little"), (off_targets + slot * 48 + 3) * 8)


@pytest.fixture(scope="module")
def text():
    seg = Segment.create(workers=4, routes=8, targets=4, listeners=2, ratelimit_entries=1)
    seg.activate()
    for _ in range(3):
        shm._record_request(1, b"GET", 200, 0.003)          # le=0.005
    shm._record_request(1, b"GET", 200, 0.2)                # le=0.25
    shm._record_request(1, b"POST", 503, 45.0)              # +Inf only
    shm._record_request(2, b"DELETE", 204, 0.0001)
    shm._record_request(0, b"GET", 404, 0.0002)             # no route matched
    for event in ["cache_hit"] * 5 + ["cache_miss"] * 2 + ["ratelimit_allowed"] * 3 + ["ratelimit_rejected"]:
        shm._record_route_event(1, event)
    for i in range(10):
        shm._target_begin(0)
        health._target_end(0, 0.02, i % 5 == 0)                # 8 ok (le=0.025), 2 failures
    shm._target_begin(0)                                    # one still in flight
    seg.target_set_healthy(1, False)
    _set_circuit(seg, 1, 2)
    for _ in range(5):
        shm._listener_opened(0)
    shm._listener_closed(0)
    shm._listener_rejected(0)
    shm._listener_rejected(0)
    body = render(seg, LABELS)
    seg.close()
    return body


@pytest.fixture(scope="module")
def families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(families, family, name=None, **match):
    """{frozenset(labels): value} of the samples named `name` (default: the family) matching `match`."""
    f = families[family]
    name = name or (family + "_total" if f.type == "counter" else family)
    return {frozenset(s.labels.items()): s.value for s in f.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in match.items())}


def one(families, family, name=None, **labels):
    [value] = samples(families, family, name, **labels).values()
    return value


def test_families_types_and_one_help_each(text, families):
    expected = {
        "fastgw_http_requests": "counter",
        "fastgw_http_request_duration_seconds": "histogram",
        "fastgw_upstream_request_duration_seconds": "histogram",
        "fastgw_upstream_requests": "counter",
        "fastgw_upstream_active_requests": "gauge",
        "fastgw_upstream_target_healthy": "gauge",
        "fastgw_circuit_breaker_state": "gauge",
        "fastgw_open_connections": "gauge",
        "fastgw_connections_rejected": "counter",
        "fastgw_config_reloads": "counter",
        "fastgw_config_version": "gauge",
        "fastgw_workers": "gauge",
        "fastgw_build_info": "gauge",
        "fastgw_ratelimit_decisions": "counter",
        "fastgw_cache_requests": "counter",
    }
    assert {name: f.type for name, f in families.items()} == expected
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP")]
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(helps) == len(set(helps)) == len(types) == len(set(types)) == len(expected)
    assert text.endswith("\n")


def test_cache_and_ratelimit_counters(families):
    assert samples(families, "fastgw_cache_requests") == {
        frozenset({"route": "users", "result": "hit"}.items()): 5,
        frozenset({"route": "users", "result": "miss"}.items()): 2,
        frozenset({"route": "users", "result": "stale"}.items()): 0}
    assert samples(families, "fastgw_ratelimit_decisions") == {
        frozenset({"route": "users", "result": "allowed"}.items()): 3,
        frozenset({"route": "users", "result": "rejected"}.items()): 1}   # routes that never counted: no lines


def test_request_counters(families):
    f = "fastgw_http_requests"
    assert {s.name for s in families[f].samples} == {f + "_total"}
    assert all(set(s.labels) == {"route", "service", "method", "code"} for s in families[f].samples)
    assert samples(families, f) == {
        frozenset({"route": "users", "service": "users-svc", "method": "GET", "code": "200"}.items()): 4,
        frozenset({"route": "users", "service": "users-svc", "method": "POST", "code": "503"}.items()): 1,
        frozenset({"route": ODD, "service": "", "method": "DELETE", "code": "204"}.items()): 1,
        # slot 0 is rendered although the labels do not list it
        frozenset({"route": "", "service": "", "method": "GET", "code": "404"}.items()): 1,
    }


def _histogram(families, family, **labels):
    buckets = {s.labels["le"]: s.value for s in families[family].samples
               if s.name == family + "_bucket" and all(s.labels.get(k) == v for k, v in labels.items())}
    return (buckets, one(families, family, family + "_sum", **labels),
            one(families, family, family + "_count", **labels))


def test_request_duration_histogram(families):
    f = "fastgw_http_request_duration_seconds"
    buckets, total, count = _histogram(families, f, route="users", service="users-svc")
    bounds = [float(b) for b in buckets]
    assert bounds == list(BUCKETS) + [float("inf")]
    values = list(buckets.values())
    assert values == sorted(values)                            # cumulative
    assert buckets["+Inf"] == count == 5
    assert buckets["0.0025"] == 0 and buckets["0.005"] == 3 and buckets["0.25"] == 4 and buckets["30.0"] == 4
    assert total == pytest.approx(3 * 0.003 + 0.2 + 45.0)
    buckets, total, count = _histogram(families, f, route=ODD)
    assert buckets["0.0005"] == buckets["+Inf"] == count == 1
    assert _histogram(families, f, route="")[2] == 1
    assert not [s for s in families[f].samples if s.labels.get("route") == "idle"]   # nothing counted


def test_upstream_families(families):
    a, b = {"service": "users-svc", "target": "10.0.0.1:80"}, {"service": "users-svc", "target": "10.0.0.2:80"}
    assert one(families, "fastgw_upstream_requests", result="ok", **a) == 8
    assert one(families, "fastgw_upstream_requests", result="failure", **a) == 2
    assert one(families, "fastgw_upstream_requests", result="ok", **b) == 0
    buckets, total, count = _histogram(families, "fastgw_upstream_request_duration_seconds", **a)
    assert buckets["0.01"] == 0 and buckets["0.025"] == buckets["+Inf"] == count == 8
    assert total == pytest.approx(8 * 0.02)
    assert one(families, "fastgw_upstream_active_requests", **a) == 1
    assert one(families, "fastgw_upstream_active_requests", **b) == 0
    assert one(families, "fastgw_upstream_target_healthy", **a) == 1
    assert one(families, "fastgw_upstream_target_healthy", **b) == 0
    assert one(families, "fastgw_circuit_breaker_state", **a) == 0
    assert one(families, "fastgw_circuit_breaker_state", **b) == 2            # half_open


def test_listener_and_process_families(families):
    assert samples(families, "fastgw_open_connections") == {
        frozenset({"listener": "public"}.items()): 4, frozenset({"listener": "internal"}.items()): 0}
    assert one(families, "fastgw_connections_rejected", listener="public") == 2
    assert samples(families, "fastgw_config_reloads") == {
        frozenset({"result": "ok"}.items()): 3, frozenset({"result": "error"}.items()): 1}
    assert one(families, "fastgw_config_version") == 7
    assert one(families, "fastgw_workers") == 4
    [info] = families["fastgw_build_info"].samples
    assert info.labels == LABELS["build"] and info.value == 1


def test_label_escaping(text):
    assert 'route="we\\\\ird \\"route\\"\\nname"' in text
    assert not any(line.startswith('name"') for line in text.splitlines())   # no raw newline
