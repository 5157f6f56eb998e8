"""Failover under load: a target *process* killed with SIGKILL while keep-alive GETs are in flight
on it costs the clients nothing — every request it held is answered by another target."""
from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from upstreams import HOST, free_port, gateway_config, route

# A tiny keep-alive HTTP/1.1 server (GETs only) in its own process, so that SIGKILL kills it for
# real: the kernel then closes its sockets, resetting those with unread requests. It waits a
# moment before each answer, so that requests are in flight on it when it dies, and closes a
# connection idle for IDLE seconds, as servers do with their keep-alive timeout (shortened here):
# the gateway's pooled connections then go stale under load, as they do in production.
# MAX requests per connection (0: no limit): past it, the server closes the connection when the
# next request arrives, without answering it.
TARGET_SERVER = r"""
import asyncio, sys

PORT, NAME, IDLE, MAX = int(sys.argv[1]), sys.argv[2].encode(), float(sys.argv[3]), int(sys.argv[4])

async def serve(reader, writer):
    served = 0
    try:
        while True:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE)
            if MAX and served == MAX:
                break
            served += 1
            await asyncio.sleep(0.001)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(NAME), NAME))
            await writer.drain()
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", PORT, backlog=512)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""

CLIENTS = 32
LOAD_SECONDS = 4.0
KILL_AFTER = 1.5


class TargetProcess:
    def __init__(self, name: str, *, idle: float = 0.03, max_requests: int = 0):
        self.name, self.port = name, free_port()
        self.proc = subprocess.Popen([sys.executable, "-c", TARGET_SERVER, str(self.port), name,
                                      str(idle), str(max_requests)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((HOST, self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"target {name} did not listen on {self.port}")
                time.sleep(0.05)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def three_targets():
    targets = []
    try:
        for name in ("a", "b", "c"):
            targets.append(TargetProcess(name))
        yield targets
    finally:
        for t in targets:
            t.stop()


def keep_alive_load(port: int, stop_at: float, outcomes: Counter, lock: threading.Lock) -> None:
    """GETs on one keep-alive connection until `stop_at`; each answer's status or error counted."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    seen: Counter = Counter()
    i = 0
    while time.monotonic() < stop_at:
        i += 1
        try:
            conn.request("GET", f"/item/{i}")
            resp = conn.getresponse()
            resp.read()
            seen[resp.status] += 1
            if resp.will_close:
                conn.close()
        except (OSError, http.client.HTTPException) as exc:
            seen[type(exc).__name__] += 1
            conn.close()
    conn.close()
    with lock:
        outcomes.update(seen)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_of_a_target_under_keep_alive_load_fails_no_request(gateway, three_targets, workers):
    # Default retries: attempts 1, retry_on [connect_failure, reset]; no active health checks,
    # so only passive health and the retry path stand between the dead target and the clients.
    config = gateway_config({"up": {"targets": [{"address": f"{HOST}:{t.port}"} for t in three_targets]}},
                            [route("all", ["/**"], "up")])
    config["workers"] = workers
    gw = gateway(config)
    victim = three_targets[0]
    outcomes: Counter = Counter()
    lock = threading.Lock()
    stop_at = time.monotonic() + LOAD_SECONDS
    clients = [threading.Thread(target=keep_alive_load, args=(gw.port, stop_at, outcomes, lock), daemon=True)
               for _ in range(CLIENTS)]
    for c in clients:
        c.start()
    time.sleep(KILL_AFTER)
    victim.kill()
    for c in clients:
        c.join(LOAD_SECONDS + 15)
    assert not any(c.is_alive() for c in clients)
    failed = {k: n for k, n in outcomes.items() if k != 200}
    print(f"workers={workers}: {outcomes[200]} answered 200, failed: {failed}")
    assert outcomes[200] > 500
    assert failed == {}
    # The other targets are still served: the gateway went on after the kill.
    assert gw.request("GET", "/after").status == 200


def test_a_retry_that_meets_a_stale_pooled_connection_is_sent_again_fresh(gateway):
    # `closer` answers one request per connection, then closes the connection when the next one
    # arrives, without answering: to the gateway, every reuse of its pooled connection meets a
    # connection closed just as it was reused. `dead` was SIGKILLed: connects are refused.
    closer, dead = TargetProcess("closer", idle=30, max_requests=1), TargetProcess("dead")
    try:
        dead.kill()
        config = gateway_config({"up": {"targets": [{"address": f"{HOST}:{closer.port}"},
                                                    {"address": f"{HOST}:{dead.port}"}],
                                        "balance": {"algorithm": "round_robin"}}},
                                [route("all", ["/**"], "up")])
        gw = gateway(config)
        # Round robin alternates: every other request starts on `dead` (refused) and is retried
        # on `closer`, over the connection the previous request left in the pool.
        answers = [gw.request("GET", f"/r/{i}") for i in range(6)]
        assert [(r.status, r.body) for r in answers] == [(200, b"closer")] * 6
        lines = gw.access_log_lines(6)
        # Some request went dead -> closer's pooled connection -> a fresh connection to closer.
        assert max(line["attempts"] for line in lines) == 3
        assert all(line["upstream"] == f"{HOST}:{closer.port}" for line in lines)
    finally:
        closer.stop()
        dead.stop()
