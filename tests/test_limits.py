"""Listener limits (SPEC §3 `listeners[].limits`) and per-route `max_body_bytes`."""
from __future__ import annotations

import select
import time

import pytest

from upstreams import (RecordingUpstream, assert_error, get_request, parse_responses, proxy_config, route,
                       wait_for)

LIMITS = {"max_header_bytes": "4KiB", "max_headers": 20, "max_url_bytes": "1KiB",
          "max_body_bytes": "1KiB", "header_timeout": "1s", "idle_timeout": "1s"}
ROUTES = [route("big", ["/big/**"], "up", max_body_bytes="4KiB"),
          route("tiny", ["/tiny/**"], "up", max_body_bytes=100)]


@pytest.fixture(scope="module")
def shared(module_harness):
    up = module_harness.upstream(RecordingUpstream())
    return module_harness.gateway(proxy_config(up.port, limits=LIMITS, extra_routes=ROUTES)), up


@pytest.fixture
def gw_up(shared):
    gw, up = shared
    up.reset()
    return gw, up


def send(gw, raw: bytes, timeout: float = 5.0):
    with gw.connect() as c:
        return c.request(raw, timeout=timeout)


# --- sizes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("request_bytes, status", [
    (get_request("/h", headers=[("X-Big", "a" * 5000)]), 431),
    (get_request("/h", headers=[(f"X-H{i}", "v") for i in range(25)]), 431),
    (get_request("/" + "u" * 2000), 414),
    (get_request("/" + "u" * 1000 + "?" + "q" * 1000), 414),
], ids=["header-bytes", "header-count", "url-path", "url-with-query"])
def test_head_limits(gw_up, request_bytes, status):
    gw, up = gw_up
    assert_error(send(gw, request_bytes), status)
    assert up.requests == []


@pytest.mark.parametrize("request_bytes", [
    get_request("/h", headers=[("X-Big", "a" * 3000)]),
    get_request("/h", headers=[(f"X-H{i}", "v") for i in range(15)]),
    get_request("/" + "u" * 900),
], ids=["header-bytes", "header-count", "url"])
def test_head_just_under_limits_passes(gw_up, request_bytes):
    gw, up = gw_up
    assert send(gw, request_bytes).status == 200
    assert len(up.complete_requests) == 1


def test_body_over_limit_by_content_length_is_413(gw_up):
    gw, up = gw_up
    assert_error(send(gw, get_request("/b", method="POST", body=b"x" * 2000)), 413)
    assert up.requests == []


def test_chunked_body_over_limit_is_rejected(gw_up):
    gw, up = gw_up
    body = b"".join(b"1f4\r\n" + b"y" * 500 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n"
    with gw.connect() as c:
        c.send(b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        assert_error(c.read_final(), 413)
    wait_for(lambda: all(r.done.is_set() for r in up.requests), timeout=3)
    assert up.complete_requests == [], "the upstream must not get the over-limit body complete"


@pytest.mark.parametrize("path, size, allowed", [
    ("/big/x", 3000, True), ("/other", 3000, False), ("/tiny/x", 200, False), ("/tiny/x", 100, True),
])
def test_route_max_body_bytes_overrides_listener(gw_up, path, size, allowed):
    gw, up = gw_up
    resp = send(gw, get_request(path, method="POST", body=b"z" * size))
    if allowed:
        assert resp.status == 200 and up.requests[0].body_len == size
    else:
        assert_error(resp, 413)
        assert up.requests == []


def test_unknown_method_rejected(gw_up):
    gw, up = gw_up
    assert_error(send(gw, b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n"), {400, 501})
    assert up.requests == []


# --- timeouts ------------------------------------------------------------------------------------

def test_header_timeout_sends_408_and_closes(gw_up):
    gw, up = gw_up
    with gw.connect() as c:
        started = time.monotonic()
        c.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
        assert_error(c.read_response(timeout=4), 408)
        elapsed = time.monotonic() - started
        assert c.wait_closed(2)
    assert 0.8 <= elapsed <= 2.0, elapsed
    assert up.requests == []


def test_header_timeout_counts_the_whole_head_not_each_byte(gw_up):
    """Slowloris: a byte every 200 ms keeps no connection alive past header_timeout."""
    gw, up = gw_up
    with gw.connect() as c:
        started = time.monotonic()
        c.send(b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        while time.monotonic() - started < 4 and not select.select([c.sock], [], [], 0.2)[0]:
            try:
                c.send(b"x")
            except OSError:
                break
        answered = time.monotonic() - started
        data = c.read_until_close(timeout=2)
    assert answered <= 2.2, "the gateway must end a slow head after header_timeout"
    if data:
        assert parse_responses(data)[0].status == 408
    assert up.requests == []


def test_idle_keepalive_connection_closed_after_idle_timeout(gw_up):
    gw, _ = gw_up
    with gw.connect() as c:
        assert c.request(get_request("/first")).status == 200
        idle_since = time.monotonic()
        assert c.wait_closed(4)
        elapsed = time.monotonic() - idle_since
    assert 0.8 <= elapsed <= 2.2, elapsed


def test_active_keepalive_connection_outlives_idle_timeout(gw_up):
    gw, up = gw_up
    with gw.connect() as c:
        for i in range(5):
            assert c.request(get_request(f"/busy/{i}")).status == 200
            time.sleep(0.5)
    assert len(up.requests) == 5


# --- connections ---------------------------------------------------------------------------------

def test_max_connections_closes_extra_connection_immediately(gateway, upstream):
    gw = gateway(proxy_config(upstream.port, limits={"max_connections": 2}))
    time.sleep(0.3)                      # let the gateway notice that the startup probe closed
    first, second = gw.connect(), gw.connect()
    try:
        for c in (first, second):
            assert c.request(get_request("/in")).status == 200
        with gw.connect() as third:
            started = time.monotonic()
            try:
                third.send(get_request("/third"))
            except OSError:
                pass
            assert third.wait_closed(2), "a connection beyond max_connections must be closed"
            assert time.monotonic() - started < 1.0
            assert not third.reader.buf.startswith(b"HTTP/1.1 200")
        for c in (first, second):
            assert c.request(get_request("/still")).status == 200
        first.close()

        def new_connection_served():
            try:
                with gw.connect() as c:
                    return c.request(get_request("/freed"), timeout=2).status == 200
            except Exception:  # noqa: BLE001 - the slot may take a moment to free up
                return False

        assert wait_for(new_connection_served, timeout=3), "a freed slot must be usable again"
    finally:
        first.close()
        second.close()
    assert "/third" not in upstream.targets
