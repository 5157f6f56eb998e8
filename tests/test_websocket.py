"""WebSocket through the gateway (SPEC §4): the Upgrade request and the 101 pass, then the
connection is a raw tunnel both ways; a real websocket client and server (the `websockets`
package) on either side."""
from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect
from websockets.sync.server import serve

from upstreams import HOST, RecordingUpstream, Reply, proxy_config, route, wait_for


class WebSocketUpstream:
    """A websockets server in a thread: echoes messages, answers "who" with the handshake headers
    it saw, "push N" with N messages of its own, and "bye" by closing with code 4000."""

    def __init__(self):
        self.closes: list[int | None] = []
        self.server = serve(self._handle, HOST, 0, max_size=4 * 1024 * 1024)
        self.port = self.server.socket.getsockname()[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handle(self, ws):
        try:
            for message in ws:
                if message == "who":
                    ws.send(json.dumps({k.lower(): v for k, v in ws.request.headers.raw_items()}))
                elif isinstance(message, str) and message.startswith("push "):
                    for i in range(int(message.split()[1])):
                        ws.send(f"pushed {i}")
                elif message == "bye":
                    ws.close(4000, "server says bye")
                else:
                    ws.send(message)
        except ConnectionClosed:
            pass
        self.closes.append(ws.close_code)

    def stop(self):
        self.server.shutdown()


@pytest.fixture
def ws_upstream():
    server = WebSocketUpstream()
    yield server
    server.stop()


def test_messages_both_ways_and_close_handshake(gateway, ws_upstream):
    gw = gateway(proxy_config(ws_upstream.port))
    with connect(f"ws://{HOST}:{gw.port}/ws/chat", max_size=4 * 1024 * 1024, open_timeout=5) as ws:
        ws.send("hello")
        assert ws.recv(timeout=5) == "hello"
        big = bytes(range(256)) * 4096                       # 1 MiB binary frame, both ways
        ws.send(big)
        assert ws.recv(timeout=10) == big
        ws.send("push 50")                                   # the server speaks on its own
        assert [ws.recv(timeout=5) for _ in range(50)] == [f"pushed {i}" for i in range(50)]
        seen = json.loads((ws.send("who"), ws.recv(timeout=5))[1])
    # The client's close frame reached the server and its answer came back: a clean 1000 close.
    assert ws.close_code == 1000
    wait_for(lambda: ws_upstream.closes == [1000])
    assert seen["upgrade"] == "websocket" and "upgrade" in seen["connection"].lower()
    assert seen["sec-websocket-key"] and seen["x-forwarded-for"] == HOST and "x-request-id" in seen
    # One access-log line for the whole tunnel, with its 101.
    line = [entry for entry in gw.access_log_lines(1) if entry["path"] == "/ws/chat"]
    assert line[0]["status"] == 101 and line[0]["upstream_status"] == 101, line


def test_server_close_reaches_the_client(gateway, ws_upstream):
    gw = gateway(proxy_config(ws_upstream.port))
    with connect(f"ws://{HOST}:{gw.port}/", open_timeout=5) as ws:
        ws.send("bye")
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=5)
    assert ws.close_code == 4000 and ws.close_reason == "server says bye"


def test_many_tunnels_and_plain_requests_side_by_side(gateway, ws_upstream, start_upstream):
    plain = start_upstream(RecordingUpstream())
    gw = gateway(proxy_config(ws_upstream.port, extra_routes=[route("plain", ["/plain/**"], "p")]) |
                 {"services": {"up": {"targets": [{"address": f"{HOST}:{ws_upstream.port}"}]},
                               "p": {"targets": [{"address": f"{HOST}:{plain.port}"}]}}})
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(connect(f"ws://{HOST}:{gw.port}/ws/{i}", open_timeout=5))
                   for i in range(20)]
        for i, ws in enumerate(sockets):
            ws.send(f"m{i}")
        assert [ws.recv(timeout=5) for ws in sockets] == [f"m{i}" for i in range(20)]
        assert gw.request("GET", "/plain/x").status == 200       # HTTP goes on beside them
    wait_for(lambda: len(ws_upstream.closes) == 20)


def test_refused_upgrade_is_an_ordinary_answer_then_close(gateway, start_upstream):
    upstream = start_upstream(RecordingUpstream(handler=lambda req: Reply(
        403, [("Content-Type", "text/plain")], b"no websockets here")))
    gw = gateway(proxy_config(upstream.port))
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://{HOST}:{gw.port}/ws", open_timeout=5)
    assert refused.value.response.status_code == 403
    # On a raw socket: the answer, then the connection closes (what follows might not be HTTP).
    with socket.create_connection((HOST, gw.port), timeout=5) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                     b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                     b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 403") and data.count(b"HTTP/1.1") == 1
    assert b"connection: close" in data.lower()
    assert [r.path for r in upstream.requests] == ["/ws", "/ws"]      # /next never went upstream


def test_a_101_to_a_request_that_did_not_ask_is_refused(gateway, start_upstream):
    upstream = start_upstream(RecordingUpstream(handler=lambda req: Reply(
        101, [("Upgrade", "websocket"), ("Connection", "Upgrade")], b"")))
    gw = gateway(proxy_config(upstream.port))
    assert gw.request("GET", "/x").status == 502


def test_idle_tunnel_closes_after_the_read_timeout(gateway, ws_upstream):
    gw = gateway(proxy_config(ws_upstream.port, service_opts={"timeouts": {"read": "600ms"}}))
    with connect(f"ws://{HOST}:{gw.port}/", open_timeout=5) as ws:
        for _ in range(3):                  # traffic keeps it open past the timeout...
            time.sleep(0.3)
            ws.send("ping")
            assert ws.recv(timeout=5) == "ping"
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):   # ...silence closes it
            ws.recv(timeout=5)
    assert 0.4 < time.monotonic() - started < 2.0


def test_authentication_applies_to_the_upgrade_request(gateway, ws_upstream):
    key_hash = "sha256:" + __import__("hashlib").sha256(b"k1").hexdigest()
    config = proxy_config(ws_upstream.port, plugins=[{"key_auth": {"header": "x-api-key"}}])
    config["consumers"] = [{"name": "c1", "credentials": {"api_keys": [key_hash]}}]
    gw = gateway(config)
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://{HOST}:{gw.port}/", open_timeout=5)
    assert refused.value.response.status_code == 401
    with connect(f"ws://{HOST}:{gw.port}/", additional_headers={"x-api-key": "k1"}, open_timeout=5) as ws:
        ws.send("who")
        assert json.loads(ws.recv(timeout=5))["x-consumer-name"] == "c1"
