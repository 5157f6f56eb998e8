#!/usr/bin/env python3
"""Worker scaling: fastgw with 1, 2, ... workers in front of the same nginx origin.

Unlike e2e.py (one pinned core per proxy), nothing is pinned here: the workers, the origin and wrk
share every core of the machine, as they would on a small production host. So the figure is "how
much more does the same box serve with N workers", not per-core efficiency; on a 2-core machine
wrk and the origin take a large share of the second core. Rounds alternate the worker counts and
medians are reported. Two paths: `proxied` (through the origin, which competes for the same
cores) and `local` (a `respond` route: only fastgw and wrk use the CPUs).

    python benchmarks/workers.py --workers 1,2 --rounds 3 --duration 8
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e  # noqa: E402  (the same process, wrk and origin helpers)

ALL_CPUS = ",".join(str(c) for c in sorted(e2e.os.sched_getaffinity(0)))


def wrk(port: int, path: str, connections: int, duration: int) -> dict:
    argv = ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency",
            f"http://127.0.0.1:{port}{path}"]
    return e2e.parse_wrk(e2e.run_wrk(argv, duration))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2", help="worker counts to compare (default 1,2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=128)
    parser.add_argument("--fastgw-cmd", help="command prefix that runs fastgw (default: this checkout)")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    prefix, env = e2e.fastgw_prefix(args.fastgw_cmd)
    workload = e2e.make_workloads([2])[0]
    procs = e2e.Processes()
    paths = {"proxied": workload.path, "local": "/local"}
    results: dict[tuple[str, int], list[dict]] = {(p, n): [] for p in paths for n in counts}
    try:
        with tempfile.TemporaryDirectory(prefix="fastgw-workers-") as tmp:
            root = Path(tmp)
            (root / "origin").mkdir()
            origin_port = e2e.free_port()
            conf = e2e.write_origin_config(root / "origin", origin_port, [2])
            e2e.start_service(procs, "origin", e2e.nginx_command(conf), root / "origin",
                              origin_port, ALL_CPUS, {}, [workload])
            for rnd in range(args.rounds):
                order = counts if rnd % 2 == 0 else counts[::-1]
                for n in order:
                    workdir = root / f"fastgw-{n}-{rnd}"
                    workdir.mkdir()
                    port = e2e.free_port()
                    conf = e2e.write_fastgw_config(workdir, port, origin_port, n)
                    started = e2e.start_service(procs, f"fastgw-{n}", [*prefix, "-c", str(conf)],
                                                workdir, port, ALL_CPUS, env, [workload])
                    for label, path in paths.items():
                        wrk(port, path, args.connections, 2)          # warm-up
                        result = wrk(port, path, args.connections, args.duration)
                        results[(label, n)].append(result)
                        print(f"round {rnd + 1}: {label}, {n} worker(s): {result['rps']:,.0f} req/s, "
                              f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms", flush=True)
                    procs.stop([started])
    finally:
        procs.stop_all()
    print(f"\n| path | workers | req/s (median of {args.rounds}) | p99 ms | vs {counts[0]} worker(s) |")
    print("|---|---|---|---|---|")
    for label in paths:
        base = statistics.median(r["rps"] for r in results[(label, counts[0])])
        for n in counts:
            rps = statistics.median(r["rps"] for r in results[(label, n)])
            p99 = statistics.median(r["p99_ms"] for r in results[(label, n)])
            print(f"| {label} | {n} | {rps:,.0f} | {p99:.2f} | {rps / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
