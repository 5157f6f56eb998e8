"""Server-sent events through the gateway: each event reaches the client when the upstream sends
it, not when the stream ends."""
from __future__ import annotations

import socket
import time

from upstreams import HOST, RecordingUpstream, Reply, proxy_config


def events(n: int, pause: float):
    for i in range(n):
        if i:
            time.sleep(pause)
        yield f"id: {i}\ndata: tick {i}\n\n".encode()


def test_sse_events_arrive_one_by_one(gateway, start_upstream):
    upstream = start_upstream(RecordingUpstream(handler=lambda req: Reply(
        200, [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")],
        events(4, 0.3), chunked=True)))
    gw = gateway(proxy_config(upstream.port))
    with socket.create_connection((HOST, gw.port), timeout=5) as sock:
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        started, seen, data = time.monotonic(), [], b""
        while len(seen) < 4:
            chunk = sock.recv(65536)
            assert chunk, "the stream ended early"
            data += chunk
            while f"data: tick {len(seen)}\n\n".encode() in data:
                seen.append(time.monotonic() - started)
    assert b"text/event-stream" in data.split(b"\r\n\r\n")[0].lower()
    gaps = [b - a for a, b in zip(seen, seen[1:])]
    assert seen[0] < 0.25 and all(0.2 < g < 0.5 for g in gaps), seen     # not held back until the end
