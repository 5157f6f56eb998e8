#!/usr/bin/env python3
"""Rate-limit accuracy: for each algorithm and scope, the limit against what was admitted in each
window while clients hammered the gateway, printed as a table and drawn as a PNG (matplotlib, the
`bench` extra).

Local scope runs one gateway with 2 workers; cluster scope runs three gateway nodes sharing a
redis-server started here (batched sync every 50 ms, and per-request decisions). Windows are
counted the way the gateway numbers them (local: CLOCK_MONOTONIC, cluster: the wall clock); gcra
has no windows, so it is counted per second of its steady rate.

    python benchmarks/ratelimit_accuracy.py --windows 5 --png ratelimit-accuracy.png
"""
from __future__ import annotations

import argparse
import collections
import http.client
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LIMIT, WINDOW = 200, 1.0

CASES = [  # label, rate_limit settings, nodes, clock
    ("gcra local", {"algorithm": "gcra", "burst": 10}, 1, time.monotonic),
    ("fixed_window local", {"algorithm": "fixed_window"}, 1, time.monotonic),
    ("sliding_window local", {"algorithm": "sliding_window"}, 1, time.monotonic),
    ("fixed_window cluster, batched 50ms", {"algorithm": "fixed_window", "scope": "cluster",
                                            "sync_interval": "50ms"}, 3, time.time),
    ("fixed_window cluster, per request", {"algorithm": "fixed_window", "scope": "cluster",
                                           "sync_interval": 0}, 3, time.time),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def start_gateway(workdir: Path, settings: dict, redis_port: int | None, prefix: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    limit = {"limit": LIMIT, "window": f"{WINDOW:g}s", "key": ["route"], "headers": False, **settings}
    cluster = f'cluster: {{redis: "redis://127.0.0.1:{redis_port}/0", key_prefix: "{prefix}"}}\n' if redis_port else ""
    workdir.mkdir(parents=True)
    conf = workdir / "fastgw.yaml"
    conf.write_text(f"""\
version: 1
workers: 2
listeners: [{{name: bench, bind: "127.0.0.1:{port}"}}]
log: {{access: {{path: null}}}}
{cluster}routes:
  - {{name: limited, match: {{paths: [/x]}}, respond: {{status: 200, body: ok}}, plugins: [{{rate_limit: {limit}}}]}}
""")
    proc = subprocess.Popen([sys.executable, "-m", "fastgw", "run", "-c", str(conf)], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(workdir / "stderr.log", "wb"))
    wait_port(port)
    return proc, port


def hammer(ports: list[int], seconds: float, clock, threads_per_port: int = 4) -> list[float]:
    """Times (on `clock`) of the admitted requests."""
    admitted, stop, lock = [], threading.Event(), threading.Lock()

    def client(port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while not stop.is_set():
            conn.request("GET", "/x")
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                with lock:
                    admitted.append(clock())
    threads = [threading.Thread(target=client, args=(p,)) for p in ports for _ in range(threads_per_port)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(15)
    return admitted


def per_window(times: list[float], start: float, windows: int) -> list[int]:
    first = int(start // WINDOW) + 1                      # the first whole window
    counts = collections.Counter(int(t // WINDOW) for t in times)
    return [counts[first + i] for i in range(windows)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=5, help="whole windows measured per case")
    parser.add_argument("--png", default="ratelimit-accuracy.png")
    args = parser.parse_args()
    redis_bin = shutil.which("redis-server")
    results: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory(prefix="fastgw-rl-") as tmp:
        redis_port = free_port()
        redis = subprocess.Popen([redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no"], stdout=subprocess.DEVNULL) if redis_bin else None
        try:
            for n, (label, settings, nodes, clock) in enumerate(CASES):
                if settings.get("scope") == "cluster" and redis is None:
                    print(f"{label}: skipped (no redis-server)")
                    continue
                gateways = [start_gateway(Path(tmp) / f"case{n}-node{k}", settings,
                                          redis_port if nodes > 1 else None, f"acc{n}:") for k in range(nodes)]
                try:
                    time.sleep(0.5)
                    start = clock()
                    times = hammer([port for _, port in gateways], WINDOW * (args.windows + 1.5), clock)
                    results[label] = per_window(times, start, args.windows)
                finally:
                    for proc, _ in gateways:
                        proc.terminate()
                    for proc, _ in gateways:
                        proc.wait(15)
                counts = results[label]
                print(f"{label}: limit {LIMIT}/window, admitted per window {counts}, "
                      f"median {statistics.median(counts):.0f} ({statistics.median(counts) / LIMIT:.1%})", flush=True)
        finally:
            if redis is not None:
                redis.terminate()
                redis.wait(10)
    print(f"\n| algorithm and scope | limit per {WINDOW:g}s window | admitted per window | worst error |")
    print("|---|---|---|---|")
    for label, counts in results.items():
        worst = max(abs(c - LIMIT) for c in counts) / LIMIT
        print(f"| {label} | {LIMIT} | {', '.join(map(str, counts))} | {worst:.1%} |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib is not installed: pip install 'fastgw[bench]' for the chart)")
        return 0
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for label, counts in results.items():
        ax.plot(range(1, len(counts) + 1), counts, marker="o", label=label)
    ax.axhline(LIMIT, color="black", linestyle="--", linewidth=1, label=f"limit ({LIMIT})")
    ax.set_xlabel("window")
    ax.set_ylabel("admitted requests")
    ax.set_title("fastgw rate limits under load: admitted per window")
    ax.set_ylim(0, LIMIT * 1.4)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"\nchart: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
