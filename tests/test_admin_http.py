"""The admin HTTP server (fastgw/admin/http.py) over real sockets: the server runs on a uvloop loop in
a background thread, the tests talk to it with raw sockets and http.client."""
from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time

import msgspec
import pytest
import uvloop

from fastgw.admin import http as adminhttp
from fastgw.admin.http import AdminApp, AdminServer, HTTPError, Response

TOKEN = "s3cret"
AUTH = b"Authorization: Bearer %s\r\n" % TOKEN.encode()


def build_app(state: dict) -> AdminApp:
    app = AdminApp(token=TOKEN, public={("GET", "/status")})

    @app.route("GET", "/status")
    async def status(req):
        return {"ok": True}

    @app.route("GET", "/")
    async def index(req):
        return [f"{m} {p}" for m, p in app.routes()]

    @app.route("GET", "/services/{name}/targets/{address}")
    async def target(req):
        return {"params": req.params, "path": req.path}

    @app.route("POST", "/echo")
    async def echo(req):
        return {"body": req.json(), "query": req.query}

    @app.route("GET", "/delay")
    async def delay(req):
        await asyncio.sleep(float(req.query["s"]))
        return {"n": req.query["n"]}

    @app.route("GET", "/teapot")
    async def teapot(req):
        raise HTTPError(418, "teapot", "short and stout")

    @app.route("GET", "/fail")
    async def fail(req):
        raise RuntimeError("boom in a handler")

    @app.route("GET", "/events")
    async def events(req):
        async def gen():
            try:
                for i in range(10_000):
                    yield b"data: %d\n\n" % i
                    await asyncio.sleep(0.01)
            finally:
                state["closed"].set()
        state["closed"] = threading.Event()
        return Response.stream(gen())

    return app


class Server:
    def __init__(self, **kw):
        self.state: dict = {}
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = AdminServer(build_app(self.state), **kw)
        self.call(self.server.start("127.0.0.1", 0))
        self.port = self.server.port

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(20)

    def stop(self):
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def srv():
    s = Server(max_body=1024, header_timeout=0.5, idle_timeout=1.0)
    yield s
    s.stop()


def connect(srv) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=5)


def read_response(f, head_only=False) -> tuple[int, dict, bytes]:
    """One response from a socket file: (status, lower-case headers, body)."""
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if head_only:
        return status, headers, b""
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int(f.readline(), 16):
            body += f.read(size)
            f.readline()
        f.readline()
        return status, headers, body
    if "content-length" in headers:
        return status, headers, f.read(int(headers["content-length"]))
    return status, headers, f.read()


def exchange(srv, raw: bytes, count=1) -> list[tuple[int, dict, bytes]]:
    with connect(srv) as s:
        s.sendall(raw)
        f = s.makefile("rb")
        return [read_response(f) for _ in range(count)]


def get(srv, path, method="GET", body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    conn.request(method, path, body, {"Authorization": f"Bearer {TOKEN}", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp, (json.loads(data) if data else None)


def test_routing_params_are_percent_decoded(srv):
    resp, body = get(srv, "/services/a/targets/127.0.0.1%3A9001")
    assert resp.status == 200 and body["params"] == {"name": "a", "address": "127.0.0.1:9001"}
    # %2F is data inside one segment, not a separator
    _, body = get(srv, "/services/a%2Fb/targets/%5B%3A%3A1%5D%3A80")
    assert body["params"] == {"name": "a/b", "address": "[::1]:80"}
    assert get(srv, "/services/a/targets/")[0].status == 404      # {x} needs a non-empty segment
    assert get(srv, "/services/a/targets/x/y")[0].status == 404
    resp, body = get(srv, "/")
    assert resp.status == 200 and "GET /services/{name}/targets/{address}" in body


def test_404_and_405(srv):
    resp, body = get(srv, "/nope")
    assert resp.status == 404 and body["error"]["code"] == "not_found"
    resp, body = get(srv, "/status", "DELETE")
    assert resp.status == 405 and body["error"]["code"] == "method_not_allowed"
    assert resp.getheader("Allow") == "GET, HEAD"


def test_token(srv):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        for path in ("/teapot", "/nope"):                  # checked before routing: 401, not 404
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = json.loads(resp.read())
            assert resp.status == 401 and body["error"]["code"] == "unauthorized"
            assert resp.getheader("WWW-Authenticate") == 'Bearer realm="fastgw-admin"'
    conn.request("GET", "/status")                          # public
    assert conn.getresponse().read() == b'{"ok":true}'
    conn.request("GET", "/services/a/targets/b", headers={"Authorization": f"bearer {TOKEN}"})
    resp = conn.getresponse()
    assert resp.read() and resp.status == 200              # the scheme is case-insensitive
    # a decoded %2F must not make a path look like a public one
    srv.server.app.public = frozenset({("GET", ("services", "a", "targets", "b"))})
    conn.request("GET", "/services/a%2Ftargets/b")
    assert conn.getresponse().status == 401


def test_error_json_and_common_headers(srv):
    resp, body = get(srv, "/teapot")
    assert resp.status == 418
    assert body == {"error": {"status": 418, "code": "teapot", "message": "short and stout"}}
    assert resp.getheader("Content-Type") == "application/json"
    assert resp.getheader("Cache-Control") == "no-store"
    assert resp.getheader("X-Content-Type-Options") == "nosniff"
    assert resp.getheader("Date").endswith(" GMT")


def test_json_body(srv):
    resp, body = get(srv, "/echo?a=1&a=2&b=", "POST", b'{"x": [1, 2]}')
    assert resp.status == 200 and body == {"body": {"x": [1, 2]}, "query": {"a": "2", "b": ""}}
    for bad in (b"{nope", b""):
        resp, body = get(srv, "/echo", "POST", bad)
        assert resp.status == 400 and body["error"]["code"] == "invalid_json"


def test_body_limit(srv):
    big = b"[" + b"1," * 600 + b"1]"
    for raw in (b"POST /echo HTTP/1.1\r\n" + AUTH + b"Content-Length: %d\r\n\r\n" % len(big) + big,
                b"POST /echo HTTP/1.1\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n%s\r\n0\r\n\r\n" % (len(big), big)):
        [(status, headers, body)] = exchange(srv, raw)
        assert status == 413 and headers["connection"] == "close"
        assert msgspec.json.decode(body)["error"]["code"] == "payload_too_large"
    # too large and Expect: 100-continue: refused at once, no 100
    [(status, _, _)] = exchange(srv, b"POST /echo HTTP/1.1\r\nExpect: 100-continue\r\n"
                                b"Content-Length: 5000\r\n\r\n")
    assert status == 413


@pytest.mark.parametrize("raw", [b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", b"garbage\r\n\r\n",
                                 b"POST /echo HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                                 b"GET /status HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n"])
def test_malformed_request_400_and_close(srv, raw):
    with connect(srv) as s:
        s.sendall(raw)
        f = s.makefile("rb")
        status, headers, body = read_response(f)
        assert status in (400, 431) and headers["connection"] == "close"
        assert f.read() == b""                              # closed


def test_slow_head_408(srv):
    with connect(srv) as s:
        s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        f = s.makefile("rb")
        status, headers, _ = read_response(f)
        assert status == 408 and 0.4 < time.monotonic() - started < 2
        assert f.read() == b""


def test_idle_keep_alive_closed(srv):
    with connect(srv) as s:
        s.sendall(b"GET /status HTTP/1.1\r\n\r\n")
        f = s.makefile("rb")
        assert read_response(f)[0] == 200
        started = time.monotonic()
        assert f.read() == b"" and 0.9 < time.monotonic() - started < 3


def test_keep_alive_pipelining_and_head(srv):
    with connect(srv) as s:
        f = s.makefile("rb")
        s.sendall(b"GET /status HTTP/1.1\r\n\r\n")
        assert read_response(f)[2] == b'{"ok":true}'
        s.sendall(b"GET /status HTTP/1.1\r\n\r\n")          # same connection
        assert read_response(f)[0] == 200
        # pipelined: the slow first answer still comes first
        s.sendall(b"".join(b"GET /delay?s=%s&n=%d HTTP/1.1\r\n%s\r\n" % (d, n, AUTH)
                           for n, d in ((1, b"0.2"), (2, b"0"), (3, b"0.05"))))
        assert [json.loads(read_response(f)[2])["n"] for _ in range(3)] == ["1", "2", "3"]
        s.sendall(b"HEAD /status HTTP/1.1\r\n\r\nGET /status HTTP/1.1\r\n\r\n")
        status, headers, _ = read_response(f, head_only=True)
        assert status == 200 and headers["content-length"] == "11"
        assert read_response(f)[2] == b'{"ok":true}'        # no body after HEAD's head


def test_chunked_request_body_and_expect_continue(srv):
    with connect(srv) as s:
        f = s.makefile("rb")
        s.sendall(b"POST /echo HTTP/1.1\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n\r\n4\r\n[1, \r\n")
        time.sleep(0.05)
        s.sendall(b"2\r\n2]\r\n0\r\n\r\n")
        assert json.loads(read_response(f)[2])["body"] == [1, 2]
        s.sendall(b"POST /echo HTTP/1.1\r\n" + AUTH + b"Expect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        assert f.readline() == b"HTTP/1.1 100 Continue\r\n" and f.readline() == b"\r\n"
        s.sendall(b"true")
        assert json.loads(read_response(f)[2])["body"] is True


def test_http10(srv):
    [(status, headers, body)] = exchange(srv, b"GET /status HTTP/1.0\r\n\r\n")
    assert status == 200 and headers["connection"] == "close" and body == b'{"ok":true}'
    with connect(srv) as s:
        s.sendall(b"GET /status HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        f = s.makefile("rb")
        assert read_response(f)[1]["connection"] == "keep-alive"
        s.sendall(b"GET /status HTTP/1.0\r\n\r\n")
        assert read_response(f)[0] == 200 and f.read() == b""
    # Upgrade is ignored: a normal answer, then close
    [(status, headers, _)] = exchange(srv, b"GET /status HTTP/1.1\r\nConnection: Upgrade\r\n"
                                      b"Upgrade: websocket\r\n\r\n")
    assert status == 200 and headers["connection"] == "close"


def read_event(f) -> bytes:
    size = int(f.readline(), 16)
    data = f.read(size)
    f.readline()
    return data


def test_sse_stream_closed_on_disconnect(srv):
    s = connect(srv)
    s.sendall(b"GET /events HTTP/1.1\r\n" + AUTH + b"\r\n")
    f = s.makefile("rb")
    status, headers, _ = read_response(f, head_only=True)
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    assert headers["content-type"] == "text/event-stream" and headers["cache-control"] == "no-cache"
    assert [read_event(f) for _ in range(3)] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
    f.close()
    s.close()
    assert srv.state["closed"].wait(5)                    # the generator's finally ran
    # HTTP/1.0: no chunking, the stream ends when the server closes; server close ends streams
    with connect(srv) as s:
        s.sendall(b"GET /events HTTP/1.0\r\n" + AUTH + b"\r\n")
        f = s.makefile("rb")
        assert "transfer-encoding" not in read_response(f, head_only=True)[1]
        assert f.readline() == b"data: 0\n"
        srv.call(srv.server.close())
        assert srv.state["closed"].wait(5)
        f.read()                                            # ends (EOF)


def test_handler_exception_500_and_still_serving(srv, capsys):
    with connect(srv) as s:
        f = s.makefile("rb")
        s.sendall(b"GET /fail HTTP/1.1\r\n" + AUTH + b"\r\nGET /status HTTP/1.1\r\n\r\n")
        status, _, body = read_response(f)
        assert status == 500 and msgspec.json.decode(body)["error"] == {
            "status": 500, "code": "internal_error", "message": "internal error (see the gateway log)"}
        assert read_response(f)[0] == 200                   # same connection
    assert "boom in a handler" in capsys.readouterr().err


def test_connection_limit(srv, monkeypatch):
    monkeypatch.setattr(adminhttp, "MAX_CONNECTIONS", 2)
    held = [connect(srv) for _ in range(2)]
    for s in held:                                          # make sure both are accepted
        s.sendall(b"GET /status HTTP/1.1\r\n\r\n")
        assert read_response(s.makefile("rb"))[0] == 200
    with connect(srv) as extra:
        try:
            assert extra.recv(1) == b""
        except ConnectionResetError:
            pass
    held[0].close()
    time.sleep(0.1)
    assert exchange(srv, b"GET /status HTTP/1.1\r\n\r\n")[0][0] == 200
    held[1].close()
