#!/usr/bin/env python3
"""What plugins cost: one fastgw worker pinned to CPU 0 in front of an nginx origin (origin and wrk
on CPU 1, as in e2e.py), routes that differ only in their plugins, measured in rotating order;
medians and each route's throughput relative to the bare route.

    python benchmarks/plugins.py --rounds 3 --duration 8

Routes: bare (no plugins at all), key_auth, jwt (HS256, the same token: the verified-token cache),
ip_filter, key_auth + a request header rewrite, rate_limit (never reached: the decision and its
headers), key_auth + rate_limit + rewrite (the SPEC's 15% goal). The bare route's figure with and without plugins
elsewhere in the config shows what the plugin machinery costs a route that does not use it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e  # noqa: E402  (process, origin and wrk helpers)

KEY = "bench-key"
SECRET = "s" * 32


def token() -> str:
    import jwt
    return jwt.encode({"sub": "bench", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


ROUTES = {   # name -> plugins (YAML); every route gets the same request, credentials included
    "bare": "[]",
    "key_auth": "[{key_auth: {}}]",
    "jwt": f'[{{jwt: {{algorithms: [HS256], secret: "{SECRET}"}}}}]',
    "ip_filter": '[{ip_filter: {allow: ["127.0.0.0/8"]}}]',
    "key_auth+rewrite": "[{key_auth: {}}]",
    "rate_limit": "[{rate_limit: {limit: 1000000000, key: [ip]}}]",
    "key_auth+rate_limit+rewrite": "[{key_auth: {}}, {rate_limit: {limit: 1000000000}}]",
}


def write_config(workdir: Path, port: int, origin_port: int, with_plugins: bool) -> Path:
    import hashlib

    routes = ""
    for name, plugins in ROUTES.items():
        if not with_plugins and name != "bare":
            continue
        rewrite = "request_headers: {set: {x-api-version: '2'}}, " if name.endswith("rewrite") else ""
        routes += (f"  - {{name: {name.replace('+', '-')}, match: {{paths: [/{name}]}}, service: origin, "
                   f"rewrite: {{path: /s}}, {rewrite}plugins: {plugins}}}\n")
    conf = workdir / "fastgw.yaml"
    conf.write_text(f"""\
version: 1
workers: 1
listeners:
  - {{name: bench, bind: "127.0.0.1:{port}", limits: {{max_connections: 100000}}}}
log: {{access: {{path: null}}}}
services:
  origin: {{targets: [{{address: "127.0.0.1:{origin_port}"}}], pool: {{max_idle_per_target: 512}}}}
consumers:
  - {{name: bench, credentials: {{api_keys: ["sha256:{hashlib.sha256(KEY.encode()).hexdigest()}"]}}}}
routes:
{routes}""")
    return conf


def wrk(port: int, path: str, headers: list[str], connections: int, duration: int) -> dict:
    argv = ["taskset", "-c", e2e.LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    for header in headers:
        argv += ["-H", header]
    result = e2e.parse_wrk(e2e.run_wrk([*argv, f"http://127.0.0.1:{port}{path}"], duration))
    if result["non_2xx_3xx"]:
        raise RuntimeError(f"{path}: {result['non_2xx_3xx']} answers were not 2xx")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--fastgw-cmd", help="command prefix that runs fastgw (default: this checkout)")
    args = parser.parse_args()
    prefix, env = e2e.fastgw_prefix(args.fastgw_cmd)
    workload = e2e.make_workloads([2])[0]
    headers = [f"x-api-key: {KEY}", f"Authorization: Bearer {token()}"]
    runs = [(name, True) for name in ROUTES] + [("bare", False)]
    results: dict[tuple[str, bool], list[dict]] = {run: [] for run in runs}
    procs = e2e.Processes()
    try:
        with tempfile.TemporaryDirectory(prefix="fastgw-plugins-") as tmp:
            root = Path(tmp)
            (root / "origin").mkdir()
            origin_port = e2e.free_port()
            conf = e2e.write_origin_config(root / "origin", origin_port, [2])
            e2e.start_service(procs, "origin", e2e.nginx_command(conf), root / "origin", origin_port,
                              e2e.LOAD_CPU, {}, [workload])
            gateways = {}
            for with_plugins in (True, False):
                workdir = root / f"fastgw-{with_plugins}"
                workdir.mkdir()
                port = e2e.free_port()
                conf = write_config(workdir, port, origin_port, with_plugins)
                probe = e2e.Workload("bare", "/bare", 2)
                gateways[with_plugins] = (port, e2e.start_service(
                    procs, f"fastgw-plugins-{with_plugins}", [*prefix, "-c", str(conf)], workdir, port,
                    e2e.PROXY_CPU, env, [probe]))
            for rnd in range(args.rounds):
                order = runs[rnd % len(runs):] + runs[:rnd % len(runs)]
                for name, with_plugins in order:
                    port = gateways[with_plugins][0]
                    wrk(port, f"/{name}", headers, args.connections, 1)       # warm-up
                    result = wrk(port, f"/{name}", headers, args.connections, args.duration)
                    results[(name, with_plugins)].append(result)
                    label = name if with_plugins else "bare (no plugins in the config)"
                    print(f"round {rnd + 1}: {label}: {result['rps']:,.0f} req/s, p50 {result['p50_ms']:.2f} ms",
                          flush=True)
    finally:
        procs.stop_all()
    base = statistics.median(r["rps"] for r in results[("bare", True)])
    print(f"\n| route | req/s (median of {args.rounds}) | p50 ms | vs bare | added per request |")
    print("|---|---|---|---|---|")
    for name, with_plugins in runs:
        rps = statistics.median(r["rps"] for r in results[(name, with_plugins)])
        p50 = statistics.median(r["p50_ms"] for r in results[(name, with_plugins)])
        added_us = (1 / rps - 1 / base) * 1e6
        label = name if with_plugins else "bare, no plugins in the config"
        print(f"| {label} | {rps:,.0f} | {p50:.2f} | {rps / base:.2f}x | {added_us:+.1f} µs |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
