"""Proxying through the listening socket (SPEC §3 routes/services, §4 behaviour, §9 access log)."""
from __future__ import annotations

import http.client
import re
import time
from datetime import datetime

import pytest

from upstreams import (HOST, IncompleteResponse, RecordingUpstream, Reply, ScriptedUpstream, assert_error,
                       free_port, gateway_config, get_request, proxy_config, route, target_service)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
ROUND_ROBIN = {"balance": {"algorithm": "round_robin"}}
TRACE_ID, PARENT_ID = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


@pytest.fixture
def proxied(gateway, upstream):
    """(gateway, upstream) with the minimal proxy config."""
    return gateway(proxy_config(upstream.port)), upstream


def seen(upstream: RecordingUpstream):
    """The only request the upstream received."""
    assert len(upstream.requests) == 1, upstream.targets
    return upstream.requests[0]


def reply_with(status=200, headers=(), body=b"", **kw):
    return lambda req: Reply(status, list(headers), body, **kw)


# --- basic forwarding ----------------------------------------------------------------------------

def test_get_response_status_body_and_headers_reach_client(gateway, start_upstream):
    up = start_upstream(RecordingUpstream(reply_with(203, [("X-Up", "u1"), ("Content-Type", "text/plain")],
                                                     b"hello from upstream")))
    resp = gateway(proxy_config(up.port)).request("GET", "/a")
    assert (resp.status, resp.body) == (203, b"hello from upstream")
    assert resp.header("x-up") == "u1" and resp.header("content-type") == "text/plain"
    assert seen(up).method == "GET" and seen(up).problems == []


def test_post_body_reaches_upstream_unchanged(proxied):
    gw, up = proxied
    body = bytes(range(256)) * 40
    resp = gw.request("POST", "/submit", body=body, headers={"Content-Type": "application/octet-stream"})
    assert resp.status == 200
    req = seen(up)
    assert (req.method, req.body, req.header("content-type")) == ("POST", body, "application/octet-stream")
    assert req.problems == []


def test_method_path_and_query_reach_upstream_unchanged(proxied):
    gw, up = proxied
    target = "/a/b%20c/d;p=1?x=1&y=%2F&x=2&empty="
    with gw.connect() as c:
        assert c.request(get_request(target, method="PATCH")).status == 200
    assert (seen(up).method, seen(up).target) == ("PATCH", target)


def test_host_header_preserved(proxied):
    gw, up = proxied
    gw.request(headers={"Host": "api.example.com:8443"})
    assert seen(up).header_all("host") == ["api.example.com:8443"]


@pytest.mark.parametrize("incoming, expected", [
    ({}, "127.0.0.1"),
    ({"X-Forwarded-For": "1.2.3.4"}, "1.2.3.4, 127.0.0.1"),
])
def test_x_forwarded_for_appends_client_ip(proxied, incoming, expected):
    gw, up = proxied
    gw.request(headers=incoming)
    assert ", ".join(seen(up).header_all("x-forwarded-for")) == expected


def test_x_forwarded_proto_and_host(proxied):
    gw, up = proxied
    gw.request(headers={"Host": "shop.example.com"})
    assert seen(up).header_all("x-forwarded-proto") == ["http"]
    assert seen(up).header_all("x-forwarded-host") == ["shop.example.com"]


def test_via_names_fastgw(proxied):
    gw, up = proxied
    gw.request()
    assert "fastgw" in ", ".join(seen(up).header_all("via")).lower()


def test_request_id_generated_when_absent(proxied):
    gw, up = proxied
    gw.request()
    gw.request()
    ids = [r.header_all("x-request-id") for r in up.requests]
    assert all(len(i) == 1 and len(i[0]) >= 8 for i in ids), ids
    assert ids[0] != ids[1]


def test_request_id_passed_through_when_present(proxied):
    gw, up = proxied
    gw.request(headers={"X-Request-Id": "client-chosen-id-42"})
    assert seen(up).header_all("x-request-id") == ["client-chosen-id-42"]


def test_traceparent_keeps_trace_id_with_new_span_id(proxied):
    gw, up = proxied
    gw.request(headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    values = seen(up).header_all("traceparent")
    assert len(values) == 1
    m = re.fullmatch(rf"00-{TRACE_ID}-([0-9a-f]{{16}})-[0-9a-f]{{2}}", values[0])
    assert m, values
    assert m.group(1) not in (PARENT_ID, "0" * 16)


# --- hop-by-hop headers --------------------------------------------------------------------------

@pytest.mark.parametrize("connection", ["keep-alive, X-Secret", "close, X-Secret"])
def test_hop_by_hop_request_headers_not_forwarded(proxied, connection):
    gw, up = proxied
    hop = [("Connection", connection), ("X-Secret", "s3cret"), ("Keep-Alive", "timeout=5"),
           ("TE", "trailers"), ("Trailer", "X-Trail"), ("Upgrade", "foo/1"),
           ("Proxy-Connection", "keep-alive")]      # Proxy-Authorization goes on: test_proxy_authorization.py
    with gw.connect() as c:
        assert c.request(get_request("/hop", headers=[*hop, ("X-Normal", "n")])).status == 200
    req = seen(up)
    leaked = req.header_names() & {"x-secret", "keep-alive", "te", "trailer", "upgrade", "proxy-connection"}
    assert not leaked, req.headers
    assert not set(req.header_tokens("connection")) & {"x-secret", "upgrade"}, req.headers
    assert req.header("x-normal") == "n"


def test_hop_by_hop_response_headers_not_forwarded(gateway, start_upstream):
    up = start_upstream(RecordingUpstream(reply_with(200, [
        ("Connection", "X-Up-Secret"), ("X-Up-Secret", "s"), ("Keep-Alive", "timeout=99, max=7"),
        ("Proxy-Connection", "keep-alive"), ("Proxy-Authenticate", "Basic realm=up"), ("Trailer", "X-T"),
        ("Upgrade", "foo/1"), ("X-Normal", "n")], b"body")))
    resp = gateway(proxy_config(up.port)).request("GET", "/")
    assert resp.status == 200 and resp.body == b"body"
    names = resp.header_names()
    assert not names & {"x-up-secret", "proxy-connection", "proxy-authenticate", "trailer", "upgrade"}, resp.headers
    assert "timeout=99, max=7" not in resp.header_all("keep-alive")
    assert "x-up-secret" not in resp.header_tokens("connection")
    assert resp.header("x-normal") == "n"


# --- connection management -----------------------------------------------------------------------

def test_keepalive_20_requests_on_one_connection_reuse_upstream_connection(proxied):
    gw, up = proxied
    conn = http.client.HTTPConnection(HOST, gw.port, timeout=5)
    try:
        for i in range(20):
            conn.request("GET", f"/k/{i}")
            r = conn.getresponse()
            assert r.status == 200 and r.read()
    finally:
        conn.close()
    assert up.targets == [f"/k/{i}" for i in range(20)]
    assert up.connections_accepted <= 2
    assert len({r.conn_id for r in up.requests}) <= 2


def test_pipelined_requests_answered_in_order(proxied):
    gw, up = proxied
    with gw.connect() as c:
        c.send(get_request("/p1") + get_request("/p2") + get_request("/p3", method="POST", body=b"hello")
               + get_request("/p4") + get_request("/p5"))
        responses = [c.read_final() for _ in range(5)]
    assert [r.status for r in responses] == [200] * 5
    assert [r.json()["path"] for r in responses] == ["/p1", "/p2", "/p3", "/p4", "/p5"]
    assert responses[2].json()["body"] == "hello"
    assert up.targets == ["/p1", "/p2", "/p3", "/p4", "/p5"]


def test_http10_client_gets_unchunked_body_and_close(gateway, start_upstream):
    body = [b"part-%d;" % i for i in range(50)]
    up = start_upstream(RecordingUpstream(reply_with(200, [], body, chunked=True)))
    gw = gateway(proxy_config(up.port))
    with gw.connect() as c:
        resp = c.request(get_request("/ten", version="HTTP/1.0"))
        assert c.wait_closed(3), "a HTTP/1.0 request without keep-alive must end with close"
    assert resp.status == 200 and resp.body == b"".join(body)
    assert not resp.chunked and "keep-alive" not in resp.header_tokens("connection")


def test_http10_keepalive_only_when_asked(proxied):
    gw, _ = proxied
    with gw.connect() as c:
        first = c.request(get_request("/a", version="HTTP/1.0", headers=[("Connection", "keep-alive")]))
        assert first.status == 200 and not first.chunked
        if "keep-alive" in first.header_tokens("connection"):
            assert c.request(get_request("/b", version="HTTP/1.0", headers=[("Connection", "keep-alive")])).status == 200
        else:
            assert c.wait_closed(3)


# --- bodies --------------------------------------------------------------------------------------

def test_expect_100_continue(proxied):
    gw, up = proxied
    with gw.connect() as c:
        c.send(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        assert c.read_response(timeout=3).status == 100
        c.send(b"hello")
        final = c.read_final()
    assert final.status == 200 and final.json()["body"] == "hello"
    assert seen(up).body == b"hello"


def test_expect_100_continue_with_too_large_body_gets_413_without_100(gateway, upstream):
    gw = gateway(proxy_config(upstream.port, limits={"max_body_bytes": "1KiB"}))
    with gw.connect() as c:
        c.send(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\nExpect: 100-continue\r\n\r\n")
        resp = c.read_response(timeout=3)
    assert_error(resp, 413)
    assert upstream.requests == []


def test_chunked_request_body_is_forwarded_decoded(proxied):
    gw, up = proxied
    chunks = [b"hello", b" ", b"world" * 1000, b"!"]
    raw = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    with gw.connect() as c:
        resp = c.request(b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + raw)
    assert resp.status == 200
    req = seen(up)
    assert req.complete and req.body == b"".join(chunks) and req.problems == []


def test_chunked_response_body_reaches_client_intact(gateway, start_upstream):
    pieces = [b"a", b"bc" * 3000, b"", b"d" * 70000, b"end"]
    up = start_upstream(RecordingUpstream(reply_with(200, [], pieces, chunked=True)))
    gw = gateway(proxy_config(up.port))
    with gw.connect() as c:
        first = c.request(get_request("/chunky"))
        second = c.request(get_request("/again"))
    assert first.status == 200 and first.body == b"".join(pieces)
    assert second.body == b"".join(pieces)


# --- local answers -------------------------------------------------------------------------------

def test_respond_route_answers_json_without_upstream(gateway, upstream):
    gone = route("maintenance", ["/old/**"], respond={"status": 410, "json": {"error": "gone"}})
    gw = gateway(proxy_config(upstream.port, extra_routes=[gone]))
    resp = gw.request("GET", "/old/page")
    assert resp.status == 410 and resp.json() == {"error": "gone"}
    assert "json" in resp.header("content-type")
    assert upstream.connections_accepted == 0


def test_respond_route_text_body_and_headers(gateway, upstream):
    hello = route("hello", ["/hello"], respond={"status": 200, "body": "hi there\n",
                                                "headers": {"content-type": "text/plain", "x-local": "yes"}})
    resp = gateway(proxy_config(upstream.port, extra_routes=[hello])).request("GET", "/hello")
    assert (resp.status, resp.body) == (200, b"hi there\n")
    assert resp.header("x-local") == "yes" and resp.header("content-type") == "text/plain"
    assert upstream.connections_accepted == 0


def test_echo_service_returns_the_request_as_json(gateway):
    gw = gateway(gateway_config({"echo": {"kind": "echo"}}, [route("echo", ["/echo/**"], "echo")]))
    resp = gw.request("POST", "/echo/hello?x=1", headers={"X-Test": "42"}, body=b"abc")
    assert resp.status == 200 and "json" in resp.header("content-type")
    doc = resp.json()
    assert doc["method"] == "POST" and doc["path"].startswith("/echo/hello")
    headers = doc["headers"]
    pairs = headers.items() if isinstance(headers, dict) else headers
    assert ("x-test", "42") in [(k.lower(), v) for k, v in pairs], headers


def test_no_route_is_404_json(gateway, upstream):
    gw = gateway(proxy_config(upstream.port, match={"paths": ["/api/**"]}))
    err = assert_error(gw.request("GET", "/nothing/here"), 404, "no_route")
    assert isinstance(err["message"], str)
    assert upstream.requests == []


# --- rewrites and header edits -------------------------------------------------------------------

@pytest.mark.parametrize("route_keys, sent, expected", [
    ({"match": {"paths": ["/v2/users/{id}"]}, "rewrite": {"path": "/users/{id}"}},
     "/v2/users/42?x=1&y=2", "/users/42?x=1&y=2"),
    ({"match": {"paths": ["/api/**"]}, "rewrite": {"strip_prefix": "/api"}},
     "/api/items/7?q=a", "/items/7?q=a"),
], ids=["path-template", "strip-prefix"])
def test_rewrite_path_keeps_query(gateway, upstream, route_keys, sent, expected):
    gw = gateway(proxy_config(upstream.port, **route_keys))
    assert gw.request("GET", sent).status == 200
    assert seen(upstream).target == expected


def test_rewrite_host(gateway, upstream):
    gw = gateway(proxy_config(upstream.port, rewrite={"host": "users.internal"}))
    gw.request(headers={"Host": "api.example.com"})
    assert seen(upstream).header_all("host") == ["users.internal"]
    assert seen(upstream).header("x-forwarded-host") == "api.example.com"


def test_request_header_edits(gateway, upstream):
    edits = {"set": {"x-set": "gw"}, "add": {"x-add": "gw"}, "remove": ["x-remove"], "rename": {"x-old": "x-new"}}
    gw = gateway(proxy_config(upstream.port, request_headers=edits))
    with gw.connect() as c:
        c.request(get_request("/", headers=[("X-Set", "client"), ("X-Add", "client"), ("X-Remove", "r"),
                                            ("X-Old", "o")]))
    req = seen(upstream)
    assert req.header_all("x-set") == ["gw"]
    assert sorted(req.header_tokens("x-add")) == ["client", "gw"]
    assert "x-remove" not in req.header_names() and "x-old" not in req.header_names()
    assert req.header_all("x-new") == ["o"]


def test_response_header_edits(gateway, start_upstream):
    up = start_upstream(RecordingUpstream(reply_with(200, [("Server", "upstream/1.0"), ("X-Drop", "d"),
                                                           ("X-Resp", "up")], b"ok")))
    gw = gateway(proxy_config(up.port, response_headers={"set": {"x-resp": "gw"}, "remove": ["server", "x-drop"]}))
    resp = gw.request()
    assert resp.header_all("x-resp") == ["gw"]
    assert "x-drop" not in resp.header_names()
    assert "upstream/1.0" not in resp.header_all("server")


# --- matching and balancing ----------------------------------------------------------------------

@pytest.fixture
def two_upstreams(start_upstream):
    return start_upstream(RecordingUpstream(name="a")), start_upstream(RecordingUpstream(name="b"))


@pytest.mark.parametrize("host, expected", [
    ("api.example.com", "a"), ("api.example.com:8080", "a"), ("shop.example.com", "b"),
    ("deep.shop.example.com", "b"), ("example.com", None), ("api.example.org", None),
])
def test_host_matching_exact_and_wildcard(gateway, two_upstreams, host, expected):
    a, b = two_upstreams
    gw = gateway(gateway_config({"a": target_service(a.port), "b": target_service(b.port)}, [
        route("exact", ["/**"], "a", hosts=["api.example.com"]),
        route("wild", ["/**"], "b", hosts=["*.example.com"])]))
    resp = gw.request(headers={"Host": host})
    if expected is None:
        assert_error(resp, 404, "no_route")
    else:
        assert resp.status == 200 and resp.json()["server"] == expected


def test_methods_matcher_selects_route(gateway, two_upstreams):
    a, b = two_upstreams
    gw = gateway(gateway_config({"a": target_service(a.port), "b": target_service(b.port)}, [
        route("read", ["/thing"], "a", methods=["GET"]), route("write", ["/thing"], "b", methods=["POST"])]))
    assert gw.request("GET", "/thing").json()["server"] == "a"
    assert gw.request("POST", "/thing", body=b"x").json()["server"] == "b"
    assert_error(gw.request("DELETE", "/thing"), 404, "no_route")


def test_round_robin_alternates_between_two_targets(gateway, two_upstreams):
    a, b = two_upstreams
    gw = gateway(proxy_config([a.port, b.port], service_opts=ROUND_ROBIN))
    servers = [gw.request("GET", f"/rr/{i}").json()["server"] for i in range(10)]
    assert servers.count("a") == servers.count("b") == 5
    assert all(x != y for x, y in zip(servers, servers[1:])), servers


# --- upstream failures ---------------------------------------------------------------------------

@pytest.mark.parametrize("close_delay, pause", [(0.0, 0.0), (0.1, 0.4)], ids=["closes-at-once", "closes-while-idle"])
def test_upstream_closing_keepalive_connection_silently_is_not_an_error(gateway, start_upstream, close_delay, pause):
    up = start_upstream(ScriptedUpstream(OK, close=True, close_delay=close_delay))
    gw = gateway(proxy_config(up.port))
    with gw.connect() as c:
        for i in range(6):
            resp = c.request(get_request(f"/s/{i}"))
            assert (resp.status, resp.body) == (200, b"ok"), i
            time.sleep(pause)
    assert [r.target for r in up.complete_requests] == [f"/s/{i}" for i in range(6)]


@pytest.mark.parametrize("where", ["service", "route"])
def test_silent_upstream_times_out_with_504(gateway, start_upstream, where):
    up = start_upstream(ScriptedUpstream(None))
    if where == "service":
        config = proxy_config(up.port, service_opts={"timeouts": {"read": "500ms"}})
    else:
        config = proxy_config(up.port, timeout="500ms")
    gw = gateway(config)
    started = time.monotonic()
    resp = gw.request("GET", "/slow", timeout=5)
    elapsed = time.monotonic() - started
    assert_error(resp, 504, "upstream_timeout")
    assert 0.4 <= elapsed < 1.5, elapsed


def test_nothing_listening_is_502(gateway):
    gw = gateway(proxy_config(free_port()))
    assert_error(gw.request("GET", "/"), 502, "upstream_error")


@pytest.fixture
def bad_and_good(gateway, start_upstream, upstream):
    """factory(raw_response, **scripted_kw) -> (gateway, scripted): /bad/** goes to the scripted
    upstream, everything else to the recording `upstream`."""
    def make(responses, **kw):
        bad = start_upstream(ScriptedUpstream(responses, **kw))
        gw = gateway(gateway_config({"bad": target_service(bad.port), "up": target_service(upstream.port)},
                                    [route("bad", ["/bad/**"], "bad"), route("all", ["/**"], "up")]))
        return gw, bad
    return make


def test_garbage_response_is_502_and_gateway_keeps_serving(bad_and_good, upstream):
    gw, _ = bad_and_good(b"THIS IS NOT HTTP\r\n\r\n", close=True)
    assert_error(gw.request("GET", "/bad/1"), 502, "upstream_error")
    assert gw.request("GET", "/good").status == 200
    assert_error(gw.request("GET", "/bad/2"), 502, "upstream_error")
    assert upstream.targets == ["/good"]


def test_response_with_content_length_and_transfer_encoding_is_502(bad_and_good):
    gw, _ = bad_and_good(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nhello\r\n0\r\n\r\n", close=True)
    assert_error(gw.request("GET", "/bad/x"), 502, "upstream_error")
    assert gw.request("GET", "/good").status == 200


def test_unrequested_100_continue_then_200(bad_and_good):
    gw, _ = bad_and_good([b"HTTP/1.1 100 Continue\r\n\r\n" + OK,
                          b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"])
    with gw.connect() as c:
        first = c.request(get_request("/bad/1"))
        second = c.request(get_request("/bad/2"))
    assert (first.status, first.body) == (200, b"ok")
    assert (second.status, second.body) == (200, b"second")


def test_head_response_with_content_length_and_no_body(bad_and_good):
    gw, bad = bad_and_good([b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: text/plain\r\n\r\n", OK])
    with gw.connect() as c:
        head = c.request(get_request("/bad/h", method="HEAD"), head_request=True)
        after = c.request(get_request("/bad/next"), timeout=3)
    assert head.status == 200 and head.header("content-length") == "1000"
    assert (after.status, after.body) == (200, b"ok")
    assert [r.method for r in bad.requests] == ["HEAD", "GET"]


def test_304_with_content_length_forwards_no_body(bad_and_good):
    gw, _ = bad_and_good([b'HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\nETag: "v1"\r\n\r\n', OK])
    with gw.connect() as c:
        c.send(get_request("/bad/cached", headers=[("If-None-Match", '"v1"')]))
        not_modified = c.read_final()
        after = c.request(get_request("/bad/next"), timeout=3)
        assert c.reader.buf == bytearray()
    assert not_modified.status == 304 and not_modified.header("etag") == '"v1"'
    assert (after.status, after.body) == (200, b"ok")


def test_response_cut_short_closes_client_connection(bad_and_good):
    gw, _ = bad_and_good(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100, close=True)
    with gw.connect() as c:
        c.send(get_request("/bad/cut"))
        try:
            resp = c.read_final(timeout=5)
        except IncompleteResponse as e:       # streamed: the head and some bytes, then the close
            assert e.response is None or (e.response.status == 200 and e.response.body_len < 1000)
        else:                                 # or nothing was sent yet and the gateway answered 502
            assert_error(resp, 502, "upstream_error")


# --- access log ----------------------------------------------------------------------------------

def test_access_log_line_per_request_with_fields(gateway, start_upstream):
    up = start_upstream(RecordingUpstream(reply_with(201, [("Content-Type", "text/plain")], b"created!")))
    gw = gateway(proxy_config(up.port))
    before = time.time()
    sent = get_request("/log/path?x=1", host="logs.example", method="POST", body=b"hello world",
                       headers=[("X-Request-Id", "rid-123"), ("User-Agent", "tests/1"),
                                ("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01")])
    with gw.connect() as c:
        resp = c.request(sent)
        assert resp.status == 201
        c.request(get_request("/second"))
        c.request(get_request("/third"))
    lines = gw.access_log_lines(min_count=3)
    assert len(lines) == 3, lines
    line = next(entry for entry in lines if entry.get("request_id") == "rid-123")
    expected = {"client_ip": "127.0.0.1", "method": "POST", "host": "logs.example", "status": 201,
                "route": "all", "service": "up", "upstream": f"127.0.0.1:{up.port}", "upstream_status": 201,
                "user_agent": "tests/1", "trace_id": TRACE_ID}
    assert {k: line.get(k) for k in expected} == expected
    assert line["path"] in ("/log/path", "/log/path?x=1")
    assert 11 <= line["bytes_in"] <= len(sent)                          # the body, or the whole request
    assert 8 <= line["bytes_out"] <= len(resp.raw_head) + 8             # the body, or with the head
    assert 0 <= line["duration_s"] < 5
    ts = line["ts"]
    ts = ts if isinstance(ts, (int, float)) else datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    assert before - 5 <= ts <= time.time() + 5


def test_date_added_when_the_upstream_sends_none_and_kept_when_it_does(bad_and_good):
    """RFC 9110 §6.6.1: a proxy with a clock adds Date to a response that lacks one."""
    upstream_date = "Tue, 01 Dec 2026 10:00:00 GMT"
    gw, _ = bad_and_good([b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                          f"HTTP/1.1 200 OK\r\nDate: {upstream_date}\r\nContent-Length: 2\r\n\r\nok".encode()])
    with gw.connect() as c:
        added = c.request(get_request("/bad/1"))
        kept = c.request(get_request("/bad/2"))
    assert added.header("date", "").endswith(" GMT")
    assert [v for k, v in kept.headers if k.lower() == "date"] == [upstream_date]


def test_local_answers_carry_a_date(gateway, upstream):
    gw = gateway(proxy_config(upstream.port, extra_routes=[
        route("gone", ["/gone"], respond={"status": 410, "json": {"error": "gone"}})]))
    assert gw.request("GET", "/gone").header("date", "").endswith(" GMT")
