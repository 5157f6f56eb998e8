#!/usr/bin/env python3
"""End-to-end load benchmark: fastgw vs nginx vs HAProxy in front of the same nginx origin.

Every proxy runs pinned to CPU 0; the origin and wrk share CPU 1, so each proxy gets exactly one
core. Proxies are measured in rotating order across rounds and the medians are reported.
See benchmarks/README.md for what the numbers mean.

    python benchmarks/e2e.py --only nginx,haproxy --quick
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import http.client
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
PROXY_CPU = "0"
LOAD_CPU = "1"  # origin + wrk: they must not steal cycles from the proxy under test
WARMUP_S = 2
START_TIMEOUT_S = 20.0
STOP_GRACE_S = 5.0
LOAD_SATURATED_PCT = 95
OTHER_NOISY_PCT = 10
ALL_PROXIES = ("fastgw", "nginx", "haproxy")
# binary -> Debian package that provides it
TOOLS = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk", "taskset": "util-linux"}
# nginx and haproxy live in sbin, which is often missing from a non-root PATH.
EXTRA_PATH = ("/usr/sbin", "/sbin")
CLK_TCK = os.sysconf("SC_CLK_TCK")  # unit of /proc/stat and /proc/PID/stat times


class StartError(Exception):
    """A process under test did not come up; the benchmark skips it."""


# --- workloads ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Workload:
    label: str
    path: str
    size: int
    close: bool = False  # send `Connection: close`: one TCP connection per request

    def describe(self) -> str:
        conn = "Connection: close" if self.close else "keep-alive"
        return f"{self.size} B body, {conn}, GET {self.path}"


def origin_path(size: int) -> str:
    """The 2-byte body is nginx's `return`; every other size is a static file of exactly that size."""
    if size == 2:
        return "/s"
    return f"/b{size // 1024}k" if size % 1024 == 0 else f"/b{size}"


def make_workloads(sizes: list[int]) -> list[Workload]:
    workloads = [Workload("small" if s == 2 else origin_path(s)[2:], origin_path(s), s)
                 for s in sizes]
    if 2 in sizes:
        workloads.append(Workload("small-close", "/s", 2, close=True))
    return workloads


# --- config writers -------------------------------------------------------------------------------

def nginx_conf(workdir: Path, http_body: str) -> str:
    # Everything nginx would write (pid, logs, temp files) goes into the temp dir, never into /var.
    temp_paths = "\n".join(f"    {kind}_temp_path {workdir / kind};"
                           for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""\
daemon off;
master_process off;
worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
{temp_paths}
    keepalive_requests 1000000;
    keepalive_timeout 60s;
{http_body}
}}
"""


def write_origin_config(workdir: Path, port: int, sizes: list[int]) -> Path:
    www = workdir / "www"
    www.mkdir()
    locations = ""
    for size in sizes:
        path = origin_path(size)
        if size == 2:
            locations += f'        location = {path} {{ default_type text/plain; return 200 "ok"; }}\n'
        else:
            (www / path.lstrip("/")).write_bytes(b"x" * size)
            locations += f"        location = {path} {{ }}\n"
    body = f"""\
    sendfile on;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {www};
{locations}    }}"""
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf(workdir, body))
    return conf


def write_nginx_proxy_config(workdir: Path, port: int, origin_port: int) -> Path:
    body = f"""\
    upstream o {{
        server 127.0.0.1:{origin_port};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://o;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
        }}
    }}"""
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf(workdir, body))
    return conf


def write_haproxy_config(workdir: Path, port: int, origin_port: int) -> Path:
    conf = workdir / "haproxy.cfg"
    conf.write_text(f"""\
global
    # No maxconn: HAProxy derives it from the fd limit, and asking for more than that fails.
    nbthread 1

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 30s
    timeout client 30s
    timeout server 30s
    timeout http-request 30s
    timeout http-keep-alive 30s

frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    server origin 127.0.0.1:{origin_port}
""")
    return conf


def write_fastgw_config(workdir: Path, port: int, origin_port: int, workers: int = 1) -> Path:
    """`/local` is answered by fastgw itself (benchmarks/workers.py); everything else is proxied."""
    conf = workdir / "fastgw.yaml"
    conf.write_text(f"""\
version: 1
workers: {workers}
listeners:
  - {{name: bench, bind: "127.0.0.1:{port}", limits: {{max_connections: 100000}}}}
log: {{access: {{path: null}}}}
services:
  origin: {{targets: [{{address: "127.0.0.1:{origin_port}"}}], pool: {{max_idle_per_target: 512}}}}
routes:
  - {{name: local, match: {{paths: ["/local"]}}, respond: {{status: 200, body: "ok"}}}}
  - {{name: all, match: {{paths: ["/**"]}}, service: origin}}
""")
    return conf


# --- proxies --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Proxy:
    name: str
    write_config: Callable[[Path, int, int], Path]  # (workdir, port, origin_port) -> config file
    command: Callable[[Path], list[str]]             # config file -> argv (without CPU pinning)
    env: dict[str, str] = dataclasses.field(default_factory=dict)


def nginx_command(conf: Path) -> list[str]:
    # -e: nginx opens its compiled-in error log before reading the config unless told otherwise.
    return ["nginx", "-p", str(conf.parent), "-e", str(conf.parent / "error.log"), "-c", str(conf)]


def fastgw_prefix(override: str | None) -> tuple[list[str], dict[str, str]]:
    """The command that starts fastgw, and extra environment for it."""
    if override:
        return shlex.split(override), {}
    # Prefer the fastgw installed next to this interpreter (a virtualenv that may not be on PATH)
    # over whatever else PATH finds.
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    installed = shutil.which("fastgw", path=search)
    if installed:
        return [installed, "run"], {}
    # Not installed: run the checkout this script lives in.
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return [sys.executable, "-m", "fastgw", "run"], {"PYTHONPATH": pythonpath}


def make_proxies(fastgw_cmd: str | None) -> dict[str, Proxy]:
    fg_prefix, fg_env = fastgw_prefix(fastgw_cmd)
    return {
        "fastgw": Proxy("fastgw", write_fastgw_config,
                        lambda conf: [*fg_prefix, "-c", str(conf)], fg_env),
        "nginx": Proxy("nginx", write_nginx_proxy_config, nginx_command),
        # -db: stay in the foreground, so the PID we hold is the process doing the work.
        "haproxy": Proxy("haproxy", write_haproxy_config,
                         lambda conf: ["haproxy", "-db", "-f", str(conf)]),
    }


# --- process management ---------------------------------------------------------------------------

_LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: if this script is SIGKILLed, its children still go away."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclasses.dataclass
class Started:
    name: str
    proc: subprocess.Popen
    port: int
    stderr_path: Path

    def stderr_tail(self, lines: int = 15) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """Every long-running process this script starts, so that all of them can be stopped by PID."""

    def __init__(self) -> None:
        self.started: list[Started] = []

    def start(self, name: str, argv: list[str], workdir: Path, port: int, cpu: str,
              env: dict[str, str]) -> Started:
        stderr_path = workdir / "stderr.log"
        with open(workdir / "stdout.log", "wb") as out, open(stderr_path, "wb") as err:
            # taskset execs the target, so the PID is the proxy's own. A new session keeps a
            # terminal Ctrl-C away from the children: this script decides when they stop.
            proc = subprocess.Popen(["taskset", "-c", cpu, *argv], cwd=workdir,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    env={**os.environ, **env}, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        started = Started(name, proc, port, stderr_path)
        self.started.append(started)
        return started

    def stop(self, targets: list[Started]) -> None:
        """SIGTERM, then SIGKILL whatever is left after STOP_GRACE_S."""
        for s in targets:
            _signal_group(s.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for s in targets:
            try:
                s.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for s in targets:
            # The group (pgid == our child's PID, from start_new_session) also holds any worker
            # processes a proxy forked; kill those too if the leader left them behind.
            _signal_group(s.proc.pid, signal.SIGKILL)
            s.proc.wait()
            if s in self.started:
                self.started.remove(s)

    def stop_all(self) -> None:
        self.stop(list(self.started))


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_ready(started: Started, workloads: list[Workload]) -> None:
    """Until the process answers 200 with the right body size on every workload path."""
    deadline = time.monotonic() + START_TIMEOUT_S
    last_error = "no answer"
    while time.monotonic() < deadline:
        rc = started.proc.poll()
        if rc is not None:
            raise StartError(f"exited with status {rc}")
        try:
            answers = [(w, *http_get(started.port, w.path)) for w in workloads]
        except (OSError, http.client.HTTPException) as e:
            last_error = f"{type(e).__name__}: {e}"
        else:
            # A wrong answer may be transient (e.g. a 502 while the upstream pool comes up).
            wrong = [f"GET {w.path}: {status}, {len(body)} bytes (want 200, {w.size})"
                     for w, status, body in answers if status != 200 or len(body) != w.size]
            if not wrong:
                return
            last_error = "; ".join(wrong)
        time.sleep(0.1)
    raise StartError(f"not ready after {START_TIMEOUT_S:.0f} s ({last_error})")


def start_service(procs: Processes, name: str, argv: list[str], workdir: Path, port: int,
                  cpu: str, env: dict[str, str], workloads: list[Workload]) -> Started:
    try:
        started = procs.start(name, argv, workdir, port, cpu, env)
    except OSError as e:
        raise StartError(f"cannot execute {argv[0]}: {e}") from e
    try:
        wait_ready(started, workloads)
    except StartError as e:
        procs.stop([started])
        tail = started.stderr_tail() or "(empty)"
        raise StartError(f"{e}\n  stderr tail:\n    " + tail.replace("\n", "\n    ")) from None
    return started


# --- wrk ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class RunResult:
    workload: str
    proxy: str
    round: int
    position: int  # 0-based place in this round's order
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx_3xx: int
    socket_errors: dict[str, int]
    proxy_cpu_pct: float  # busy share of the proxy's core during the run
    load_cpu_pct: float   # same for the origin + wrk core
    other_cpu_pct: float  # CPU used by processes outside this benchmark, in % of one core

    @property
    def errors(self) -> int:
        return self.non_2xx_3xx + sum(self.socket_errors.values())


TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
LATENCY_RE = re.compile(r"^\s+(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
RPS_RE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
REQUESTS_RE = re.compile(r"^\s+(\d+) requests in ", re.M)
NON_2XX_RE = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
SOCKET_RE = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def wrk_argv(port: int, w: Workload, connections: int, duration: int, latency: bool) -> list[str]:
    argv = ["taskset", "-c", LOAD_CPU, "wrk", "-t1", f"-c{connections}", f"-d{duration}s"]
    if latency:
        argv.append("--latency")
    if w.close:
        argv += ["-H", "Connection: close"]
    return [*argv, f"http://127.0.0.1:{port}{w.path}"]


def run_wrk(argv: list[str], duration: int) -> str:
    # Not subprocess.run: on Ctrl-C it kills the child but does not reap it.
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_die_with_parent)
    try:
        # wrk stops itself after `duration`; the timeout only guards against a hung proxy.
        out, err = proc.communicate(timeout=duration + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.strip() or out}")
    return out


def parse_wrk(output: str) -> dict:
    latencies = {pct: float(value) * TIME_UNITS_MS[unit]
                 for pct, value, unit in LATENCY_RE.findall(output)}
    rps, requests = RPS_RE.search(output), REQUESTS_RE.search(output)
    if rps is None or requests is None or set(latencies) != {"50", "99"}:
        raise ValueError(f"cannot parse wrk output:\n{output}")
    non_2xx = NON_2XX_RE.search(output)
    sock = SOCKET_RE.search(output)
    return {
        "rps": float(rps.group(1)),
        "p50_ms": latencies["50"],
        "p99_ms": latencies["99"],
        "requests": int(requests.group(1)),
        "non_2xx_3xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": dict(zip(("connect", "read", "write", "timeout"),
                                  map(int, sock.groups()))) if sock else {},
    }


@dataclasses.dataclass
class CpuSample:
    """Cumulative CPU ticks (USER_HZ) of the two benchmark cores and of our own processes."""
    busy: dict[str, int]   # per core: user nice system irq softirq
    total: dict[str, int]  # per core: all ticks
    process: int           # user+nice+system on both cores: what processes (anyone's) used
    steal: int             # both cores: time the hypervisor gave our vCPUs to someone else
    ours: int              # user+system of this benchmark's processes


def core_ticks() -> dict[str, list[int]]:
    """user nice system idle iowait irq softirq steal, per benchmark core, from /proc/stat."""
    cores = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if name in (f"cpu{PROXY_CPU}", f"cpu{LOAD_CPU}"):
                cores[name[3:]] = [int(v) for v in values[:8]]  # guest time is already in user
    return cores


def proc_stats():
    """(pid, fields of /proc/PID/stat after "(comm)": state ppid pgrp ... utime(11) stime(12))
    for every live process; comm may hold spaces, so the fields start after its last ")"."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        yield int(entry.name), stat[stat.rfind(")") + 2:].split()


def our_ticks(our_groups: set[int]) -> int:
    """CPU ticks of live processes in our process groups, plus reaped children (the wrk runs)."""
    ticks = 0
    for _, fields in proc_stats():
        if int(fields[2]) in our_groups:
            ticks += int(fields[11]) + int(fields[12])
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ticks + round((children.ru_utime + children.ru_stime) * CLK_TCK)


def sample_cpu(our_groups: set[int]) -> CpuSample:
    cores = core_ticks()
    return CpuSample(
        busy={c: sum(t[:3]) + t[5] + t[6] for c, t in cores.items()},
        total={c: sum(t) for c, t in cores.items()},
        process=sum(t[0] + t[1] + t[2] for t in cores.values()),
        steal=sum(t[7] for t in cores.values()),
        ours=our_ticks(our_groups))


def cpu_usage(before: CpuSample, after: CpuSample) -> dict[str, float]:
    """Busy % of the proxy core and the load core, and % of a core used by anyone else
    (other processes, or the hypervisor running other VMs)."""
    def pct(core: str) -> float:
        total = after.total[core] - before.total[core]
        return 100.0 * (after.busy[core] - before.busy[core]) / total if total else 0.0
    elapsed_ticks = (after.total[PROXY_CPU] - before.total[PROXY_CPU]) or 1
    others = ((after.process - before.process) - (after.ours - before.ours)
              + (after.steal - before.steal))
    return {"proxy_cpu_pct": round(pct(PROXY_CPU), 1), "load_cpu_pct": round(pct(LOAD_CPU), 1),
            "other_cpu_pct": round(max(0.0, 100.0 * others / elapsed_ticks), 1)}


def measure(s: Started, w: Workload, rnd: int, position: int, our_groups: set[int],
            args) -> RunResult:
    run_wrk(wrk_argv(s.port, w, args.connections, WARMUP_S, latency=False), WARMUP_S)
    # Core utilisation tells whether the proxy was the bottleneck: if the load core is saturated
    # while the proxy core is not, the run measured wrk + origin, not the proxy. On a shared
    # machine other processes take time from both; `other` makes such runs visible.
    before = sample_cpu(our_groups)
    out = run_wrk(wrk_argv(s.port, w, args.connections, args.duration, latency=True),
                  args.duration)
    after = sample_cpu(our_groups)
    return RunResult(w.label, s.name, rnd, position, **parse_wrk(out), **cpu_usage(before, after))


def benchmark(procs: Processes, services: list[Started], workloads: list[Workload],
              args) -> list[RunResult]:
    # Each started process leads its own group; wrk stays in this script's.
    our_groups = {os.getpgrp()} | {s.proc.pid for s in procs.started}
    results = []
    for w in workloads:
        for rnd in range(args.rounds):
            # Rotate the order each round so that no proxy always runs first (cold caches,
            # CPU frequency, noisy neighbours on a shared machine).
            order = services[rnd % len(services):] + services[:rnd % len(services)]
            for position, s in enumerate(order):
                if s.proc.poll() is not None:
                    print(f"  {s.name} has exited (status {s.proc.returncode}); "
                          f"stderr:\n{s.stderr_tail()}", flush=True)
                    continue
                r = measure(s, w, rnd + 1, position, our_groups, args)
                mark = f"  ERRORS: {r.errors}" if r.errors else ""
                print(f"  [{w.label} round {rnd + 1}] {s.name:8} {r.rps:10.0f} req/s  "
                      f"p50 {r.p50_ms:7.3f} ms  p99 {r.p99_ms:7.3f} ms  "
                      f"CPU proxy {r.proxy_cpu_pct:3.0f}% load {r.load_cpu_pct:3.0f}% "
                      f"other {r.other_cpu_pct:3.0f}%{mark}",
                      flush=True)
                results.append(r)
    return results


# --- report ---------------------------------------------------------------------------------------

def tool_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "nproc": str(os.cpu_count()),
        "kernel": f"{platform.system()} {platform.release()}",
        "loadavg_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "nginx": tool_version(["nginx", "-v"]),
        "haproxy": tool_version(["haproxy", "-v"]),
        "wrk": tool_version(["wrk", "--version"]),
    }


def summarize(results: list[RunResult], workloads: list[Workload],
              names: list[str]) -> dict[str, dict[str, dict]]:
    summary: dict[str, dict[str, dict]] = {}
    for w in workloads:
        per_proxy = {}
        for name in names:
            runs = [r for r in results if r.workload == w.label and r.proxy == name]
            if runs:
                per_proxy[name] = {
                    "rps": statistics.median(r.rps for r in runs),
                    "p50_ms": statistics.median(r.p50_ms for r in runs),
                    "p99_ms": statistics.median(r.p99_ms for r in runs),
                    "proxy_cpu_pct": statistics.median(r.proxy_cpu_pct for r in runs),
                    "load_cpu_pct": statistics.median(r.load_cpu_pct for r in runs),
                    "other_cpu_pct": statistics.median(r.other_cpu_pct for r in runs),
                    "runs": len(runs),
                    "runs_with_errors": sum(1 for r in runs if r.errors),
                    "errors": sum(r.errors for r in runs),
                }
        summary[w.label] = per_proxy
    return summary


def markdown_report(info: dict[str, str], settings: dict, summary: dict,
                    workloads: list[Workload], skipped: dict[str, str]) -> str:
    out = ["## End-to-end benchmark", ""]
    out += [f"- **{key}**: {value}" for key, value in {**info, **settings}.items()]
    out += [f"- **skipped {name}**: {why.splitlines()[0]}" for name, why in skipped.items()]
    for w in workloads:
        rows = summary.get(w.label)
        if not rows:
            continue
        base = rows.get("nginx")
        out += ["", f"### {w.label} ({w.describe()})", "",
                "| proxy | req/s | p50 ms | p99 ms | req/s vs nginx | p99 vs nginx | errors "
                "| CPU % proxy / load / other |",
                "|---|--:|--:|--:|--:|--:|--:|--:|"]
        for name, m in rows.items():
            rps_ratio = f"{m['rps'] / base['rps']:.2f}x" if base and base["rps"] else "n/a"
            p99_ratio = f"{m['p99_ms'] / base['p99_ms']:.2f}x" if base and base["p99_ms"] else "n/a"
            errors = (f"**{m['errors']}** ({m['runs_with_errors']}/{m['runs']} runs)"
                      if m["errors"] else "0")
            out.append(f"| {name} | {m['rps']:.0f} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} "
                       f"| {rps_ratio} | {p99_ratio} | {errors} "
                       f"| {m['proxy_cpu_pct']:.0f} / {m['load_cpu_pct']:.0f} "
                       f"/ {m['other_cpu_pct']:.0f} |")
        notes = []
        if any(m["load_cpu_pct"] >= LOAD_SATURATED_PCT for m in rows.values()):
            notes.append(f"Load core >= {LOAD_SATURATED_PCT}% busy: wrk + origin may have capped "
                         "req/s here, so the ratios understate the differences between proxies.")
        idle = [name for name, m in rows.items()
                if max(m["proxy_cpu_pct"], m["load_cpu_pct"]) < LOAD_SATURATED_PCT - 5]
        if idle:
            notes.append(f"Neither core was saturated for {', '.join(idle)}: the proxy waited on "
                         "something (timers, Nagle, a lock), or the host was contended.")
        if any(m["other_cpu_pct"] >= OTHER_NOISY_PCT for m in rows.values()):
            notes.append(f"Other processes used >= {OTHER_NOISY_PCT}% of a core during these "
                         "runs: the machine was not quiet, treat the numbers with suspicion.")
        out += [line for note in notes for line in ("", note)]
    return "\n".join(out) + "\n"


# --- setup ----------------------------------------------------------------------------------------

def ensure_tools(no_install: bool) -> None:
    """Make every tool runnable by name, installing missing ones with apt-get once if we may."""
    path = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join(path + [d for d in EXTRA_PATH if d not in path])
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing and not no_install and os.geteuid() == 0 and shutil.which("apt-get"):
        packages = sorted({TOOLS[t] for t in missing})
        print(f"installing {' '.join(packages)} with apt-get", flush=True)
        subprocess.run(["apt-get", "install", "-y", *packages], check=False, timeout=600)
        missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        sys.exit(f"e2e: missing {', '.join(missing)}; install with "
                 f"`apt-get install -y {' '.join(sorted({TOOLS[t] for t in missing}))}`")


def check_cpus() -> None:
    if not {int(PROXY_CPU), int(LOAD_CPU)} <= os.sched_getaffinity(0):
        sys.exit(f"e2e: needs CPUs {PROXY_CPU} and {LOAD_CPU} (proxy and load generator "
                 f"on separate cores); this process may use {sorted(os.sched_getaffinity(0))}")


def raise_on_termination() -> None:
    """SIGINT/SIGTERM/SIGHUP unwind the stack, so the cleanup in `finally` runs."""
    def handler(signum, _frame):
        raise SystemExit(128 + signum)
    # Also when started in the background by a shell, which would have SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="rounds per workload")
    p.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run")
    p.add_argument("--connections", type=int, default=50, help="wrk connections")
    p.add_argument("--sizes", default="2,16384,262144",
                   help="response body sizes in bytes; 2 also adds the small-close workload")
    p.add_argument("--only", default=",".join(ALL_PROXIES), help="proxies to measure")
    p.add_argument("--fastgw-cmd", help='command prefix for fastgw, e.g. "python -m fastgw run"; '
                                        "`-c CONFIG` is appended (default: `fastgw run`, or "
                                        "`python -m fastgw run` on this checkout if not installed)")
    p.add_argument("--json", type=Path, help="also write raw per-round results here")
    p.add_argument("--quick", action="store_true", help="1 round of 3 s (a smoke test)")
    p.add_argument("--no-install", action="store_true", help="never apt-get missing tools")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration = 1, 3
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(args.only) - set(ALL_PROXIES)
    if unknown:
        p.error(f"unknown proxy {', '.join(sorted(unknown))}; choose from {', '.join(ALL_PROXIES)}")
    if not args.sizes or min(args.sizes) < 1 or args.rounds < 1 or args.duration < 1:
        p.error("--sizes, --rounds and --duration must be positive")
    return args


def run(args: argparse.Namespace, tmp: Path, procs: Processes) -> None:
    workloads = make_workloads(args.sizes)
    origin_dir = tmp / "origin"
    origin_dir.mkdir()
    origin_port = free_port()
    conf = write_origin_config(origin_dir, origin_port, args.sizes)
    try:
        start_service(procs, "origin", nginx_command(conf), origin_dir, origin_port, LOAD_CPU,
                      {}, workloads)
    except StartError as e:
        sys.exit(f"e2e: the nginx origin did not start: {e}")
    print(f"origin: nginx on 127.0.0.1:{origin_port} (CPU {LOAD_CPU})", flush=True)

    proxies = make_proxies(args.fastgw_cmd)
    services, skipped = [], {}
    for name in args.only:
        proxy = proxies[name]
        workdir = tmp / name
        workdir.mkdir()
        port = free_port()
        argv = proxy.command(proxy.write_config(workdir, port, origin_port))
        try:
            services.append(start_service(procs, name, argv, workdir, port, PROXY_CPU,
                                          proxy.env, workloads))
            print(f"{name}: 127.0.0.1:{port} (CPU {PROXY_CPU}): {shlex.join(argv)}", flush=True)
        except StartError as e:
            skipped[name] = f"{e}\n  command: {shlex.join(argv)}"
            print(f"SKIPPING {name}: {skipped[name]}", flush=True)
    if not services:
        sys.exit("e2e: no proxy started; nothing to measure")

    info = machine_info()
    settings = {
        "settings": f"{args.rounds} rounds x {args.duration} s (+{WARMUP_S} s warm-up), "
                    f"wrk -t1 -c{args.connections}, proxies on CPU {PROXY_CPU}, "
                    f"origin (nginx) + wrk on CPU {LOAD_CPU}, medians over rounds",
    }
    results = benchmark(procs, services, workloads, args)
    names = [s.name for s in services]
    summary = summarize(results, workloads, names)
    print("\n" + markdown_report(info, settings, summary, workloads, skipped), flush=True)

    if args.json:
        args.json.write_text(json.dumps({
            "machine": info,
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "workloads": [dataclasses.asdict(w) for w in workloads],
            "skipped": skipped,
            "summary": summary,
            "runs": [dataclasses.asdict(r) for r in results],
        }, indent=2, default=str) + "\n")
        print(f"raw results written to {args.json}")


def run_and_clean_up(name: str, body: Callable[[Path, "Processes"], None]) -> int:
    """Run `body(tmp, procs)` and, however it ends (Ctrl-C, kill, an error), stop every process
    it started and remove its temp dir."""
    started_at = time.monotonic()
    raise_on_termination()
    tmp = Path(tempfile.mkdtemp(prefix=f"fastgw-{name}-"))
    procs = Processes()
    try:
        body(tmp, procs)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything this run started", file=sys.stderr)
        return 130
    finally:
        # A second Ctrl-C or kill must not abort the cleanup half-way, leaving processes behind.
        signal.alarm(0)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"total time: {time.monotonic() - started_at:.0f} s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_tools(args.no_install)
    check_cpus()
    return run_and_clean_up("e2e", lambda tmp, procs: run(args, tmp, procs))


if __name__ == "__main__":
    sys.exit(main())
