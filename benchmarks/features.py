#!/usr/bin/env python3
"""What the answer-producing features cost: a cache hit next to nginx's static answer, aggregation's
overhead over its slowest backend, and the HTTP/JSON -> gRPC translation.

    python benchmarks/features.py --rounds 3 --duration 5 [--only cache,aggregate,grpc]

One fastgw worker and the nginx being compared run pinned to CPU 0 (one core each, measured one
after the other); origins, the delay server, the gRPC server and wrk share CPU 1 (as e2e.py).

- cache: wrk on a route whose every request is a cache HIT (1 KiB JSON), and on nginx serving the
  same bytes as a static file; ratio fastgw/nginx.
- aggregate: (a) latency, one client, one request at a time: three backends answering after 5, 10
  and 20 ms, aggregated, against the 20 ms backend proxied alone — the difference is what
  aggregation adds over its slowest backend; (b) wrk on an aggregation of three instant nginx
  backends against the bare proxied route (three backend calls per request).
- grpc: latency, one at a time, of GET /inventory/abc translated to shop.v1.Inventory/GetItem against
  the same call made directly with a grpc client, and a bare proxied HTTP request for scale; wrk
  throughput of the translated route (bounded by the Python gRPC server on CPU 1).
"""
from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import e2e  # noqa: E402
import plugins  # noqa: E402  (its wrk runner)

BODY_1K = b'{"items": [' + b",".join(b'{"id": %d, "name": "item"}' % i for i in range(40)) + b"]}"

DELAY_SERVER = textwrap.dedent("""
    # GET /d/<ms>: a JSON answer after <ms> milliseconds (keep-alive, HTTP/1.1).
    import asyncio, sys, uvloop
    async def serve(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\\r\\n\\r\\n")
                path = head.split(b" ", 2)[1]
                await asyncio.sleep(int(path.rsplit(b"/", 1)[1]) / 1000)
                body = b'{"path": "' + path + b'", "ok": true}'
                writer.write(b"HTTP/1.1 200 OK\\r\\ncontent-type: application/json\\r\\ncontent-length: "
                             + str(len(body)).encode() + b"\\r\\n\\r\\n" + body)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
    async def main():
        server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]))
        await server.serve_forever()
    uvloop.run(main())
""")


GRPC_SERVER = textwrap.dedent("""
    # The tests' shop.v1.Inventory grpc.aio server in its own process (grpc and fork do not mix):
    # prints its address, serves until killed.
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from grpc_fixtures import running_inventory_server
    with running_inventory_server(sys.argv[2]) as server:
        print(server.address, flush=True)
        while True:
            time.sleep(3600)
""")


def start_grpc_server(procs: e2e.Processes, workdir: Path, descriptors: str) -> str:
    src = workdir / "grpc_server.py"
    src.write_text(GRPC_SERVER)
    started = procs.start("grpc", [sys.executable, str(src), str(HERE.parent / "tests"), descriptors],
                          workdir, 0, e2e.LOAD_CPU, {})
    deadline = time.monotonic() + e2e.START_TIMEOUT_S
    while time.monotonic() < deadline:
        address = (workdir / "stdout.log").read_text().strip()
        if address:
            return address
        if started.proc.poll() is not None:
            raise e2e.StartError(f"the gRPC server exited: {started.stderr_tail()}")
        time.sleep(0.1)
    raise e2e.StartError("the gRPC server did not start")


def json_origin(workdir: Path, port: int) -> Path:
    (workdir / "www").mkdir()
    (workdir / "www" / "item.json").write_bytes(BODY_1K)
    conf = workdir / "nginx.conf"
    conf.write_text(e2e.nginx_conf(workdir, f"""\
    default_type application/json;
    server {{
        listen 127.0.0.1:{port};
        root {workdir / "www"};
        location = /item.json {{ }}
        location /j {{ return 200 '{{"ok": true}}'; }}
    }}"""))
    return conf


def fastgw_config(workdir: Path, port: int, origin: int, delay: int, grpc: tuple[str, str] | None) -> Path:
    grpc_service = grpc_routes = ""
    if grpc:
        grpc_service = (f'  inventory: {{scheme: grpc, targets: [{{address: "{grpc[0]}"}}], '
                        f'grpc: {{descriptors: "{grpc[1]}"}}}}\n')
        grpc_routes = ('  - {name: inventory, match: {paths: ["/inventory/{sku}"]}, '
                       'grpc: {service: inventory, method: shop.v1.Inventory/GetItem}}\n')
    conf = workdir / "fastgw.yaml"
    conf.write_text(f"""\
version: 1
workers: 1
listeners:
  - {{name: bench, bind: "127.0.0.1:{port}", limits: {{max_connections: 100000}}}}
log: {{access: {{path: null}}}}
services:
  origin: {{targets: [{{address: "127.0.0.1:{origin}"}}], pool: {{max_idle_per_target: 512}}}}
  d5: {{targets: [{{address: "127.0.0.1:{delay}"}}]}}
  d10: {{targets: [{{address: "127.0.0.1:{delay}"}}]}}
  d20: {{targets: [{{address: "127.0.0.1:{delay}"}}]}}
{grpc_service}routes:
  - {{name: cached, match: {{paths: [/cached]}}, service: origin, rewrite: {{path: /item.json}},
     plugins: [{{cache: {{ttl: 1h}}}}]}}
  - {{name: bare, match: {{paths: [/bare]}}, service: origin, rewrite: {{path: /j}}}}
  - {{name: slow, match: {{paths: [/slow]}}, service: d20, rewrite: {{path: /d/20}}}}
  - name: agg-slow
    match: {{paths: ["/agg-slow/{{id}}"]}}
    aggregate: {{backends: [{{service: d5, path: /d/5, into: a}}, {{service: d10, path: /d/10, into: b}},
                           {{service: d20, path: /d/20, into: c}}]}}
  - name: agg-fast
    match: {{paths: ["/agg-fast/{{id}}"]}}
    aggregate: {{backends: [{{service: origin, path: /j, into: a}}, {{service: origin, path: /j, into: b}},
                           {{service: origin, path: /j, into: c}}]}}
{grpc_routes}""")
    return conf


def wrk(port: int, path: str, connections: int, duration: int) -> dict:
    return plugins.wrk(port, path, [], connections, duration)


def sequential_ms(port: int, path: str, n: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{path}: {resp.status}")
        times.append((time.perf_counter() - started) * 1000)
    conn.close()
    return times


def direct_grpc_ms(address: str, descriptors: str, n: int) -> list[float]:
    import grpc
    from grpc_fixtures import _message_classes

    m = _message_classes(descriptors)
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/shop.v1.Inventory/GetItem",
                                   request_serializer=m["GetItemRequest"].SerializeToString,
                                   response_deserializer=m["Item"].FromString)
        times = []
        for _ in range(n):
            started = time.perf_counter()
            call(m["GetItemRequest"](sku="abc"), timeout=5)
            times.append((time.perf_counter() - started) * 1000)
    return times


def median(values) -> float:
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--samples", type=int, default=300, help="requests per latency measurement")
    parser.add_argument("--only", default="cache,aggregate,grpc")
    parser.add_argument("--fastgw-cmd", help="command prefix that runs fastgw (default: this checkout)")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    prefix, env = e2e.fastgw_prefix(args.fastgw_cmd)
    os.sched_setaffinity(0, {int(e2e.LOAD_CPU)})     # this script, its clients and the gRPC server
    procs = e2e.Processes()
    results: dict[str, list] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="fastgw-features-") as tmp:
            root = Path(tmp)
            for name in ("origin", "static", "delay", "fastgw", "grpc"):
                (root / name).mkdir()
            origin_port, static_port, delay_port, port = (e2e.free_port() for _ in range(4))
            item = e2e.Workload("item", "/item.json", len(BODY_1K))
            e2e.start_service(procs, "origin", e2e.nginx_command(json_origin(root / "origin", origin_port)),
                              root / "origin", origin_port, e2e.LOAD_CPU, {}, [item])
            e2e.start_service(procs, "nginx-static", e2e.nginx_command(json_origin(root / "static", static_port)),
                              root / "static", static_port, e2e.PROXY_CPU, {}, [item])
            delay_src = root / "delay" / "delay_server.py"
            delay_src.write_text(DELAY_SERVER)
            e2e.start_service(procs, "delay", [sys.executable, str(delay_src), str(delay_port)], root / "delay",
                              delay_port, e2e.LOAD_CPU, {}, [])
            grpc = None
            if "grpc" in parts:
                from grpc_fixtures import build_inventory_descriptors
                descriptors = build_inventory_descriptors(root / "protos")
                grpc = (start_grpc_server(procs, root / "grpc", descriptors), descriptors)
            conf = fastgw_config(root / "fastgw", port, origin_port, delay_port, grpc)
            e2e.start_service(procs, "fastgw", [*prefix, "-c", str(conf)], root / "fastgw", port,
                              e2e.PROXY_CPU, env, [e2e.Workload("cached", "/cached", len(BODY_1K))])
            for rnd in range(args.rounds):
                def throughput(label: str, p: int, path: str) -> None:
                    wrk(p, path, args.connections, 1)                  # warm-up
                    r = wrk(p, path, args.connections, args.duration)
                    results.setdefault(label, []).append(r)
                    print(f"round {rnd + 1}: {label}: {r['rps']:,.0f} req/s, p99 {r['p99_ms']:.2f} ms", flush=True)

                if "cache" in parts:
                    throughput("fastgw cache hit", port, "/cached")
                    throughput("nginx static file", static_port, "/item.json")
                if "aggregate" in parts:
                    sequential_ms(port, "/agg-slow/1", 20)
                    results.setdefault("agg-slow", []).append(median(sequential_ms(port, "/agg-slow/1", args.samples)))
                    results.setdefault("slow", []).append(median(sequential_ms(port, "/slow", args.samples)))
                    throughput("bare proxy", port, "/bare")
                    throughput("aggregate of 3", port, "/agg-fast/1")
                if "grpc" in parts:
                    sequential_ms(port, "/inventory/abc", 20)
                    results.setdefault("grpc via fastgw", []).append(
                        median(sequential_ms(port, "/inventory/abc", args.samples)))
                    results.setdefault("grpc direct", []).append(median(direct_grpc_ms(grpc[0], grpc[1], args.samples)))
                    results.setdefault("http via fastgw", []).append(median(sequential_ms(port, "/bare", args.samples)))
                    wrk(port, "/inventory/abc", 16, 1)
                    r = wrk(port, "/inventory/abc", 16, args.duration)
                    results.setdefault("grpc wrk", []).append(r)
                    print(f"round {rnd + 1}: grpc translated: {r['rps']:,.0f} req/s, p50 {r['p50_ms']:.2f} ms", flush=True)
    finally:
        procs.stop_all()
    print(f"\nMedians of {args.rounds} rounds ({args.duration} s wrk runs, {args.connections} connections):\n")
    if "cache" in parts:
        hit = median(r["rps"] for r in results["fastgw cache hit"])
        static = median(r["rps"] for r in results["nginx static file"])
        print("| 1 KiB JSON, one core | req/s | p99 ms |\n|---|---|---|")
        for label in ("fastgw cache hit", "nginx static file"):
            rs = results[label]
            print(f"| {label} | {median(r['rps'] for r in rs):,.0f} | {median(r['p99_ms'] for r in rs):.2f} |")
        print(f"\ncache hit / nginx static: {hit / static:.2f}x\n")
    if "aggregate" in parts:
        agg, slow = median(results["agg-slow"]), median(results["slow"])
        print(f"aggregation of 5/10/20 ms backends: p50 {agg:.2f} ms; the 20 ms backend proxied alone: "
              f"p50 {slow:.2f} ms; overhead over the slowest backend: {agg - slow:+.2f} ms")
        bare = median(r["rps"] for r in results["bare proxy"])
        fast = median(r["rps"] for r in results["aggregate of 3"])
        print(f"throughput: bare proxy {bare:,.0f} req/s, aggregate of 3 instant backends {fast:,.0f} req/s "
              f"({fast / bare:.2f}x; {(1 / fast - 1 / bare) * 1e6:+.0f} µs per aggregated request)\n")
    if "grpc" in parts:
        via, direct, http_ = (median(results[k]) for k in ("grpc via fastgw", "grpc direct", "http via fastgw"))
        rps = median(r["rps"] for r in results["grpc wrk"])
        print(f"GetItem, one at a time (p50): via fastgw (HTTP/JSON) {via:.3f} ms, direct gRPC {direct:.3f} ms, "
              f"bare HTTP proxy hop {http_:.3f} ms; translation adds {via - direct:+.3f} ms over a direct call")
        print(f"translated route under load (16 connections): {rps:,.0f} req/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
