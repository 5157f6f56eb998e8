"""Request smuggling and strict parsing (SPEC §4 "Strictness").

Each malformed request must get a JSON 400 (or the status listed) and the connection closed; the
upstream must never receive a complete request other than the legitimate one sent before on the same
connection. (A streaming proxy may already have forwarded the head of a request whose body turns out
malformed; then that upstream request must be aborted, never completed.) Every case runs alone and
after a legitimate request, against one gateway shared by the module.
"""
from __future__ import annotations

import time

import pytest

from upstreams import RecordingUpstream, assert_error, get_request, proxy_config

BAD = {400}
BAD_OR_UNSUPPORTED_CODING = {400, 501}
BAD_OR_UNSUPPORTED_VERSION = {400, 505}


def post(headers: str, body: bytes = b"", path: str = "/smuggle") -> bytes:
    """A POST to `path` with Host and the given raw header lines (CRLF-terminated)."""
    return f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode("latin-1") + body


CHUNKED = "Transfer-Encoding: chunked\r\n"

CASES = {
    # framing conflicts
    "cl-and-te": (post("Content-Length: 5\r\n" + CHUNKED, b"0\r\n\r\n"), BAD),
    "two-content-lengths": (post("Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"), BAD),
    "content-length-list": (post("Content-Length: 1, 2\r\n", b"ab"), BAD),
    "negative-content-length": (post("Content-Length: -1\r\n", b"a"), BAD),
    "content-length-plus-sign": (post("Content-Length: +5\r\n", b"hello"), BAD),
    "te-chunked-identity": (post("Transfer-Encoding: chunked, identity\r\n", b"0\r\n\r\n"), BAD),
    "te-gzip": (post("Transfer-Encoding: gzip\r\n", b"\x1f\x8b"), BAD_OR_UNSUPPORTED_CODING),
    "te-gzip-chunked": (post("Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"), BAD_OR_UNSUPPORTED_CODING),
    "te-xchunked": (post("Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n"), BAD_OR_UNSUPPORTED_CODING),
    "te-two-fields": (post(CHUNKED + "Transfer-Encoding: identity\r\n", b"0\r\n\r\n"), BAD),
    "te-space-before-colon": (post("Transfer-Encoding : chunked\r\n", b"0\r\n\r\n"), BAD),
    # classic smuggling payloads
    "cl-te-classic": (post("Content-Length: 6\r\n" + CHUNKED, b"0\r\n\r\nG", path="/"), BAD),
    "te-cl-classic": (post("Content-Length: 4\r\n" + CHUNKED,
                           b"5c\r\nGPOST /smuggled HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                           b"Content-Length: 15\r\n\r\nx=1\r\n0\r\n\r\n"), BAD),
    # header syntax
    "obs-fold": (b"GET /smuggle HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n  b\r\n\r\n", BAD),
    "bare-cr-in-value": (b"GET /smuggle HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", BAD),
    "nul-in-value": (b"GET /smuggle HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", BAD),
    "ctl-in-value": (b"GET /smuggle HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n", BAD),
    "bare-lf-line-endings": (b"GET /smuggle HTTP/1.1\nHost: x\n\n", BAD),
    # chunked body syntax
    "chunk-size-not-hex": (post(CHUNKED, b"zz\r\nhello\r\n0\r\n\r\n"), BAD),
    "chunk-size-overflow": (post(CHUNKED, b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n"), BAD),
    "chunk-data-overrun": (post(CHUNKED, b"5\r\nhelloXX\r\n0\r\n\r\n"), BAD),
    "chunk-bare-lf": (post(CHUNKED, b"5\nhello\n0\n\n"), BAD),
    # request line and Host
    "version-http-2.0": (b"GET /smuggle HTTP/2.0\r\nHost: x\r\n\r\n", BAD_OR_UNSUPPORTED_VERSION),
    "version-http-1.2": (b"GET /smuggle HTTP/1.2\r\nHost: x\r\n\r\n", BAD_OR_UNSUPPORTED_VERSION),
    "missing-host": (b"GET /smuggle HTTP/1.1\r\nX-A: b\r\n\r\n", BAD),
    "two-hosts": (b"GET /smuggle HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", BAD),
}

LEGIT = get_request("/legit")


@pytest.fixture(scope="module")
def shared(module_harness):
    up = module_harness.upstream(RecordingUpstream())
    return module_harness.gateway(proxy_config(up.port)), up


def assert_rejected(conn, statuses: set[int]) -> None:
    resp = conn.read_final(timeout=5)
    assert_error(resp, statuses)
    assert conn.read_until_close(timeout=3) == b"", "nothing may follow the rejection"


def assert_survived(gw, up, legit: list[str], tracebacks_before: int) -> None:
    """The upstream completed exactly `legit` and aborted any other request it saw begin; a fresh
    connection still works."""
    assert gw.alive, gw.stderr_text()[-3000:]
    resp = gw.request("GET", "/alive")
    assert resp.status == 200, resp
    seen = [r for r in up.requests if r.path != "/alive"]
    assert all(r.done.wait(3) for r in seen), "a partly forwarded request must be aborted"
    assert [r.target for r in seen if r.complete] == legit, [r.raw[:300] for r in seen]
    assert gw.tracebacks() == tracebacks_before, gw.stderr_text()[-3000:]


@pytest.mark.parametrize("after_legit", [False, True], ids=["alone", "after-legit"])
@pytest.mark.parametrize("name", CASES)
def test_rejected_and_connection_closed(shared, name, after_legit):
    gw, up = shared
    payload, statuses = CASES[name]
    up.reset()
    tracebacks = gw.tracebacks()
    with gw.connect() as c:
        if after_legit:
            assert c.request(LEGIT).status == 200
        c.send(payload)
        assert_rejected(c, statuses)
    assert_survived(gw, up, ["/legit"] if after_legit else [], tracebacks)


@pytest.mark.parametrize("name", CASES)
def test_rejected_alike_when_the_head_comes_in_pieces(shared, name):
    """A head that is a whole read may be read without llhttp (protocol.pyx _simple_request); one
    that comes in pieces always goes through llhttp. Both must refuse alike."""
    gw, up = shared
    payload, statuses = CASES[name]
    up.reset()
    tracebacks = gw.tracebacks()
    with gw.connect() as c:
        c.send(payload[:5])
        time.sleep(0.02)
        c.send(payload[5:])
        assert_rejected(c, statuses)
    assert_survived(gw, up, [], tracebacks)


VALID = [
    b"GET /v?a=1&b=2 HTTP/1.1\r\nHost: x\r\nUser-Agent: t/1\r\nAccept: */*\r\n\r\n",
    b"HEAD /v HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.1\r\nConnection: keep-alive\r\n\r\n",
    b"DELETE /v/1 HTTP/1.1\r\nhost: x\r\nX-Request-Id: abc-123\r\nX-Empty:\r\nX-Tab:\tv \t\r\n\r\n",
    b"GET /v HTTP/1.0\r\nHost: x\r\nConnection: keep-alive, x-drop\r\nX-Drop: 1\r\nX-Keep: 2\r\n\r\n",
    b"POST /v HTTP/1.1\r\nHost: x\r\nX-Utf8: caf\xc3\xa9\r\nTraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n",
    b"GET http://x/v/abs HTTP/1.1\r\nHost: y\r\n\r\n",
]


@pytest.mark.parametrize("payload", VALID, ids=[p.split(b" ")[0].decode() + str(i) for i, p in enumerate(VALID)])
def test_valid_heads_reach_the_upstream_alike_whole_or_in_pieces(shared, payload):
    gw, up = shared
    seen = []
    for pieces in ([payload], [payload[:5], payload[5:]]):
        up.reset()
        with gw.connect() as c:
            for piece in pieces:
                c.send(piece)
                time.sleep(0.02)
            resp = c.read_final(head_request=payload.startswith(b"HEAD"))
        assert up.requests and up.requests[0].done.wait(3)
        # What the upstream got, minus the fields made fresh per request.
        lines = [line for line in up.requests[0].raw.split(b"\r\n\r\n")[0].split(b"\r\n")
                 if not line.lower().startswith((b"x-request-id: ", b"traceparent: "))]
        seen.append((resp.status, lines))
    assert seen[0] == seen[1]
    assert seen[0][0] == 200


def test_pipelined_smuggle_after_legit_request_in_one_write(shared):
    """The legitimate request is answered, the bad one rejected, the third never executed."""
    gw, up = shared
    up.reset()
    tracebacks = gw.tracebacks()
    with gw.connect() as c:
        c.send(LEGIT + CASES["cl-te-classic"][0] + get_request("/after"))
        assert c.read_final().status == 200
        assert_rejected(c, BAD)
    assert_survived(gw, up, ["/legit"], tracebacks)


def test_extra_spaces_in_request_line_reach_upstream_as_one_canonical_request(shared):
    """llhttp accepts `GET  /x HTTP/1.1` (as nginx does). That is safe only because the upstream
    request line is rebuilt from the parsed fields: the upstream sees one canonical request."""
    gw, up = shared
    up.reset()
    with gw.connect() as c:
        c.send(b"GET  /spaced HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.read_final().status == 200
    seen = [r for r in up.requests if r.path == "/spaced"]
    assert len(seen) == 1 and seen[0].raw.startswith(b"GET /spaced HTTP/1.1\r\n"), seen


def test_absolute_form_rejected_or_routed_by_its_authority(shared):
    """RFC 9112 §3.2.2: a server must accept absolute-form, and its authority then replaces Host.
    Rejecting it with 400 is the stricter choice a reverse proxy may make. Either way the upstream
    never sees the absolute URI or the conflicting Host."""
    gw, up = shared
    up.reset()
    tracebacks = gw.tracebacks()
    with gw.connect() as c:
        c.send(b"GET http://evil.example/abs?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = c.read_final()
        if resp.status == 400:
            assert_error(resp, 400)
            assert c.read_until_close(timeout=3) == b""
            legit = []
        else:
            assert resp.status == 200
            assert [(r.target, r.header_all("host")) for r in up.requests] == [("/abs?q=1", ["evil.example"])]
            legit = ["/abs?q=1"]
    assert_survived(gw, up, legit, tracebacks)
