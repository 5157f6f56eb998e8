#!/usr/bin/env python3
"""Instructions per request, counted by valgrind (callgrind): a figure that does not move with the
load of a shared machine, for changes too small for wrk to see (1-3%).

One process runs a fastgw listener (the compiled data plane, as a worker runs it), a client and
an origin on one uvloop loop over loopback sockets. The client sends keep-alive `GET /s` requests
one at a time; the origin answers like nginx does (Server, Date, Content-Type, Content-Length,
Connection; 2-byte body). The run is made twice, with `--small` and `--large` requests, and the
difference of the two totals divided by the difference of the counts is the cost of one request,
start-up excluded. The client and the origin are counted too (they are the same for every build),
so compare builds with this script, not with other figures. The hash salt is fixed
(PYTHONHASHSEED=0 unless set): the same build then gives the same figure within ~20 instructions
instead of ~±200. `local` answers from a `respond` route instead (no origin). Needs `valgrind`.

    python benchmarks/instructions.py [--path proxy|local] [--small 1000] [--large 6000]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ANSWER = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 28 Nov 2026 16:00:00 GMT\r\n"
          b"Content-Type: text/plain\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok")
REQUEST = b"GET /s HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"


class Origin(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        for _ in range(data.count(b"\r\n\r\n")):
            self.transport.write(ANSWER)


class Client(asyncio.Protocol):
    """Sends the next request when the previous answer ("...\\r\\n\\r\\nok") is in."""

    def __init__(self, count: int, done: asyncio.Future):
        self.left, self.done, self.received = count, done, b""

    def connection_made(self, transport):
        self.transport = transport
        transport.write(REQUEST)

    def data_received(self, data):
        self.received += data
        while b"\r\n\r\nok" in self.received:
            self.received = self.received[self.received.index(b"\r\n\r\nok") + 6:]
            self.left -= 1
            if self.left == 0:
                self.done.set_result(None)
                return
            self.transport.write(REQUEST)


async def serve_requests(path: str, count: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.test_micro import _runtime
    from fastgw._core.protocol import ListenerState

    loop = asyncio.get_running_loop()
    if path == "proxy":
        origin = await loop.create_server(Origin, "127.0.0.1", 0)
        address = f"127.0.0.1:{origin.sockets[0].getsockname()[1]}"
        runtime = _runtime([{"name": "all", "match": {"paths": ["/**"]}, "service": "api"}],
                           services={"api": {"targets": [{"address": address}]}})
    else:
        runtime = _runtime([{"name": "s", "match": {"paths": ["/s"]},
                             "respond": {"status": 200, "body": "ok"}}])
    state = ListenerState("bench", runtime.router, loop=loop)
    gateway = await loop.create_server(state.protocol_factory, "127.0.0.1", 0)
    done = loop.create_future()
    await loop.create_connection(lambda: Client(count, done), "127.0.0.1",
                                 gateway.sockets[0].getsockname()[1])
    await asyncio.wait_for(done, 300)


def instructions(path: str, count: int, workdir: Path) -> int:
    out = workdir / f"callgrind.{path}.{count}"
    run = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                          sys.executable, __file__, "--run", path, str(count)],
                         capture_output=True, text=True, timeout=900,
                         # str hashes are salted per process, which moves dict probing by a few
                         # hundred instructions per request from run to run: fix the salt.
                         env={**os.environ, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")})
    found = re.search(r"Collected : (\d+)", run.stderr)
    if run.returncode != 0 or not found:
        raise SystemExit(f"valgrind run failed:\n{run.stderr[-2000:]}")
    return int(found.group(1))


def main() -> int:
    if sys.argv[1:2] == ["--run"]:
        import uvloop

        uvloop.run(serve_requests(sys.argv[2], int(sys.argv[3])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", choices=["proxy", "local"], default="proxy")
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=6000)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("instructions: needs valgrind (apt-get install valgrind)")
    with tempfile.TemporaryDirectory(prefix="fastgw-instructions-") as tmp:
        small = instructions(args.path, args.small, Path(tmp))
        large = instructions(args.path, args.large, Path(tmp))
    print(f"{args.path}: {(large - small) / (args.large - args.small):,.0f} instructions per request "
          f"({args.small:,} requests: {small:,}; {args.large:,}: {large:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
