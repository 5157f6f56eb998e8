"""Peers that stop moving: an upstream that does not read the request body (timeouts.write), a
client that does not read the response (listener idle_timeout), and the log level."""
from __future__ import annotations

import socket
import threading
import time

from upstreams import MiB, BulkUpstream, RawConnection, assert_error, get_request, proxy_config


class SilentUpstream:
    """Accepts connections and never reads or answers: its receive buffer fills up."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            self.conns.append(conn)

    def close(self):
        self.sock.close()
        for conn in self.conns:
            conn.close()


def test_upstream_that_stops_reading_the_body_gets_504_after_the_write_timeout(gateway):
    silent = SilentUpstream()
    try:
        gw = gateway(proxy_config(silent.port, limits={"max_body_bytes": "1GiB"},
                                  service_opts={"timeouts": {"write": "500ms", "read": "30s"}}))
        with RawConnection(gw.port, timeout=10) as c:
            c.send(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (64 * MiB))
            started = time.monotonic()
            block = b"x" * 65536
            try:
                for _ in range(1024):             # until the gateway stops taking the body
                    c.sock.settimeout(0.2)
                    c.sock.sendall(block)
            except (TimeoutError, socket.timeout, OSError):
                pass
            c.sock.settimeout(10)
            resp = c.read_final(timeout=10)
            elapsed = time.monotonic() - started
        assert_error(resp, 504, "upstream_timeout")
        assert elapsed < 5, f"the write timeout took {elapsed:.1f}s"
    finally:
        silent.close()


def test_client_that_stops_reading_is_dropped_after_idle_timeout(gateway, start_upstream):
    bulk = start_upstream(BulkUpstream())
    gw = gateway(proxy_config(bulk.port, limits={"idle_timeout": "1s"}))
    with RawConnection(gw.port, timeout=10) as c:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.send(get_request(f"/bytes/{256 * MiB}"))
        time.sleep(3)                              # read nothing: buffers fill, the clock runs
        # The gateway has given up on us: what is left is what the kernels still held.
        received, ended = 0, False
        c.sock.settimeout(2)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                chunk = c.sock.recv(1 << 20)
            except ConnectionResetError:
                ended = True
                break
            except (TimeoutError, socket.timeout):
                break
            if not chunk:
                ended = True
                break
            received += len(chunk)
    assert ended, "the gateway kept the connection to a client that did not read"
    assert received < 16 * MiB
    record = gw.access_log_lines(min_count=1)[-1]
    assert record["flags"] == "DC" and record["path"].startswith("/bytes/")


def test_log_level_error_hides_info_lines(gateway, upstream):
    config = proxy_config(upstream.port)
    config.setdefault("log", {})["level"] = "error"
    gw = gateway(config)
    assert gw.request("GET", "/x").status == 200
    assert "listener" not in gw.stderr_text()


def test_log_level_info_shows_the_listener(gateway, upstream):
    gw = gateway(proxy_config(upstream.port))
    assert gw.request("GET", "/x").status == 200
    assert "listener public on http://127.0.0.1:" in gw.stderr_text()
