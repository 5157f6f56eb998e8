#!/usr/bin/env python3
"""Memory per worker: resident memory of each fastgw worker at idle and with N open keep-alive
connections (10,000 by default), then after a second request on each, then after closing them.

fastgw proxies to an nginx origin (the one from e2e.py). A client in this script opens the
connections in batches, sends `GET /s` on each, reads the full answer and keeps the connection
open. Each worker is sampled from /proc: VmRSS, Pss and the private part (Private_Clean +
Private_Dirty). RSS also counts the shared-memory segment (counters, analytics) that every
worker maps, so the private figure is the one that grows with connections. The whole run is
bounded (well under 2 minutes) and stops every process it started.
See benchmarks/README.md for how to read the numbers.

    python benchmarks/memory.py --connections 10000 --workers 1
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import errno
import json
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e  # noqa: E402  (the same process, origin and fastgw config helpers)

ALL_CPUS = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
REQUEST = b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n"
EXPECTED_BODY = b"ok"  # the origin's `return 200 "ok"`
CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 5.0
# Phase budgets. fastgw closes a keep-alive connection after 60 s idle (limits.idle_timeout), so the
# second request must reach the first connection opened well within that.
OPEN_BUDGET_S = 30.0
SECOND_REQUEST_BUDGET_S = 20.0
CLOSE_TIMEOUT_S = 5.0
SETTLE_IDLE_S = 1.0
SETTLE_CLOSED_S = 2.0
WORKERS_UP_TIMEOUT_S = 10.0
# Backstop: if anything hangs beyond the per-phase timeouts, stop everything anyway.
RUN_DEADLINE_S = 115
# fds of this script besides the connections (stdio, the event loop, files it reads).
OWN_FD_HEADROOM = 100
# fds a worker needs besides client connections: upstream connections (at most one per in-flight
# request, i.e. one batch) plus listeners, control channel, shared memory, epoll, logs.
WORKER_FD_HEADROOM = 64
KIB = 1024
MIB = 1024 * 1024


# --- /proc sampling -------------------------------------------------------------------------------

def proc_kib(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    """`Key:   1234 kB` lines of a /proc file, for the given keys, in KiB."""
    values = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in keys:
                values[key] = int(rest.split()[0])
    return values


def sample_process(pid: int) -> dict[str, float]:
    """Memory of one process in MiB, and how many fds it holds."""
    status = proc_kib(f"/proc/{pid}/status", ("VmRSS", "RssShmem"))
    rollup = proc_kib(f"/proc/{pid}/smaps_rollup", ("Pss", "Private_Clean", "Private_Dirty"))
    return {
        "rss_mib": status["VmRSS"] / KIB,
        # The memfd segment shared by the supervisor and every worker, as far as this process
        # touched it: counted whole in each worker's RSS, split between them in Pss.
        "shmem_mib": status.get("RssShmem", 0) / KIB,
        "pss_mib": rollup["Pss"] / KIB,
        "private_mib": (rollup["Private_Clean"] + rollup["Private_Dirty"]) / KIB,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def child_pids(parent: int) -> list[int]:
    """PIDs whose parent is `parent`: the supervisor's workers (psutil is not a dependency)."""
    return sorted(pid for pid, fields in e2e.proc_stats() if int(fields[1]) == parent)


def worker_label(pid: int) -> str:
    """`worker I`, from the `--index I` the supervisor passes on the worker's command line."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        argv = []
    if b"--index" in argv[:-1]:
        return f"worker {argv[argv.index(b'--index') + 1].decode()}"
    return f"child {pid}"


def wait_for_workers(supervisor: int, count: int) -> list[int]:
    deadline = time.monotonic() + WORKERS_UP_TIMEOUT_S
    while True:
        workers = child_pids(supervisor)
        if len(workers) >= count or time.monotonic() > deadline:
            return workers
        time.sleep(0.1)


def open_files_limit(pid: int) -> tuple[int, int]:
    """The soft and hard RLIMIT_NOFILE of another process, from /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return (int(soft) if soft.isdigit() else resource.RLIM_INFINITY,
                    int(hard) if hard.isdigit() else resource.RLIM_INFINITY)
    raise RuntimeError(f"no 'Max open files' in /proc/{pid}/limits")


# --- fd limits ------------------------------------------------------------------------------------

def set_soft_nofile(wanted: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and wanted > hard:
        sys.exit(f"memory: cannot raise the open-files limit to {wanted}: the hard limit is {hard}; "
                 f"raise it (`ulimit -Hn`, LimitNOFILE=, /etc/security/limits.conf) or use fewer "
                 f"--connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


# --- the client -----------------------------------------------------------------------------------

class BadResponse(Exception):
    """An answer on a held connection was not the origin's 200 "ok", or did not keep the connection."""


async def read_response(reader: asyncio.StreamReader) -> None:
    """One whole response; it must be 200 with the origin's body and keep the connection open."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    headers = {name.strip().lower(): value.strip()
               for name, _, value in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    if len(status) < 2 or status[1] != "200" or body != EXPECTED_BODY:
        raise BadResponse(f"{lines[0]!r}, {len(body)} byte body")
    if headers.get("connection", "").lower() == "close":
        raise BadResponse("Connection: close (not keep-alive)")


async def request(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    reader, writer = conn
    writer.write(REQUEST)
    await asyncio.wait_for(read_response(reader), REQUEST_TIMEOUT_S)


async def open_one(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    conn = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), CONNECT_TIMEOUT_S)
    try:
        await request(conn)
    except BaseException:
        conn[1].transport.abort()
        raise
    return conn


def error_name(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "closed by peer"
    if isinstance(exc, OSError) and exc.errno:
        return f"{type(exc).__name__} ({errno.errorcode.get(exc.errno, exc.errno)})"
    return f"{type(exc).__name__}: {exc}"


async def in_batches(items: list, batch: int, action, budget_s: float,
                     errors: collections.Counter) -> list:
    """`action(item)` for every item, `batch` at a time; the items whose action succeeded.
    Stops early when the time budget is spent, or when a whole batch failed (the gateway takes
    no more), and counts what was never tried, so that nothing fails silently."""
    deadline = time.monotonic() + budget_s
    done = []
    for start in range(0, len(items), batch):
        left = len(items) - start
        if time.monotonic() > deadline:
            errors[f"not tried: {budget_s:.0f} s budget spent"] += left
            break
        chunk = items[start:start + batch]
        results = await asyncio.gather(*(action(item) for item in chunk), return_exceptions=True)
        ok = [r for r in results if not isinstance(r, BaseException)]
        for r in results:
            if isinstance(r, BaseException):
                errors[error_name(r)] += 1
        done += ok
        if not ok:
            errors["not tried: the previous batch failed entirely"] += left - len(chunk)
            break
    return done


async def open_connections(port: int, count: int, batch: int,
                           errors: collections.Counter) -> list:
    return await in_batches(list(range(count)), batch, lambda _: open_one(port), OPEN_BUDGET_S,
                            errors)


async def second_request(conns: list, batch: int, errors: collections.Counter) -> list:
    async def again(conn):
        await request(conn)
        return conn
    return await in_batches(conns, batch, again, SECOND_REQUEST_BUDGET_S, errors)


def still_open(conns: list) -> list:
    """Connections neither side has closed (the caller lets the loop run first, so that an EOF or
    a reset from the gateway has been seen)."""
    return [(r, w) for r, w in conns if not r.at_eof() and not w.is_closing()]


async def close_all(conns: list) -> None:
    for _, writer in conns:
        writer.close()
    await asyncio.wait_for(
        asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True),
        CLOSE_TIMEOUT_S)


# --- phases ---------------------------------------------------------------------------------------

def sample_all(phase: str, supervisor: int, workers: list[int], client_open: int) -> list[dict]:
    rows = []
    for label, pid in [("supervisor", supervisor)] + [(worker_label(p), p) for p in workers]:
        try:
            rows.append({"phase": phase, "process": label, "pid": pid,
                         "client_open": client_open, **sample_process(pid)})
        except OSError as e:  # a worker died: say so in the table
            rows.append({"phase": phase, "process": label, "pid": pid,
                         "client_open": client_open, "error": str(e)})
    print(f"sampled: {phase}", flush=True)
    return rows


async def run_phases(port: int, supervisor: int, workers: list[int], args) -> dict:
    samples = []
    await asyncio.sleep(SETTLE_IDLE_S)
    samples += sample_all("idle", supervisor, workers, 0)

    open_errors: collections.Counter = collections.Counter()
    started = time.monotonic()
    conns = await open_connections(port, args.connections, args.batch, open_errors)
    open_s = time.monotonic() - started
    print(f"opened and answered: {len(conns)} of {args.connections} in {open_s:.1f} s"
          + (f"; failures: {dict(open_errors)}" if open_errors else ""), flush=True)
    await asyncio.sleep(SETTLE_IDLE_S)  # also lets a close by the gateway reach us
    held = still_open(conns)
    samples += sample_all(f"{args.connections} open", supervisor, workers, len(held))

    second_errors: collections.Counter = collections.Counter()
    answered_again = await second_request(held, args.batch, second_errors)
    print(f"second request answered on {len(answered_again)} of {len(held)} connections"
          + (f"; failures: {dict(second_errors)}" if second_errors else ""), flush=True)
    await asyncio.sleep(SETTLE_IDLE_S)
    live = still_open(answered_again)
    samples += sample_all("after 2nd request", supervisor, workers, len(live))

    try:
        await close_all(conns)
    except asyncio.TimeoutError:
        print(f"closing took longer than {CLOSE_TIMEOUT_S:.0f} s; sampling anyway", flush=True)
    await asyncio.sleep(SETTLE_CLOSED_S)
    samples += sample_all(f"closed, +{SETTLE_CLOSED_S:.0f} s", supervisor, workers, 0)
    return {
        "samples": samples,
        "opened": len(conns),
        "open_seconds": round(open_s, 1),
        "open_errors": dict(open_errors),
        "held_after_open": len(held),
        "answered_second_request": len(answered_again),
        "second_request_errors": dict(second_errors),
        "held_after_second_request": len(live),
    }


# --- report ---------------------------------------------------------------------------------------

def private_total(samples: list[dict], phase: str) -> float | None:
    rows = [s for s in samples if s["phase"] == phase and s["process"] != "supervisor"]
    if not rows or any("error" in s for s in rows):
        return None
    return sum(s["private_mib"] for s in rows)


def per_connection_kib(samples: list[dict], phase: str, connections: int) -> str:
    idle, loaded = private_total(samples, "idle"), private_total(samples, phase)
    if idle is None or loaded is None or not connections:
        return "n/a"
    return f"{(loaded - idle) * KIB / connections:.1f} KiB"


def markdown_report(info: dict, settings: dict, result: dict, args) -> str:
    out = ["## Memory per worker", ""]
    out += [f"- **{key}**: {value}" for key, value in {**info, **settings}.items()]
    out += ["", "| phase | process | client conns open | fds | RSS MiB | of which shmem "
                "| Pss MiB | private MiB |",
            "|---|---|--:|--:|--:|--:|--:|--:|"]
    for s in result["samples"]:
        if "error" in s:
            out.append(f"| {s['phase']} | {s['process']} | {s['client_open']} "
                       f"| **gone: {s['error']}** | | | | |")
            continue
        out.append(f"| {s['phase']} | {s['process']} | {s['client_open']} | {s['fds']} "
                   f"| {s['rss_mib']:.1f} | {s['shmem_mib']:.1f} | {s['pss_mib']:.1f} "
                   f"| {s['private_mib']:.1f} |")
    loaded_phase = f"{args.connections} open"
    out += ["",
            f"- **connections**: {result['opened']} of {args.connections} opened and answered "
            f"(in {result['open_seconds']} s), {result['held_after_open']} still open 1 s later, "
            f"{result['answered_second_request']} answered a second request, "
            f"{result['held_after_second_request']} still open after it",
            f"- **private memory per connection** (all workers, vs idle): "
            f"{per_connection_kib(result['samples'], loaded_phase, result['held_after_open'])} "
            f"with {result['held_after_open']} open, "
            f"{per_connection_kib(result['samples'], 'after 2nd request', result['held_after_second_request'])}"
            f" after the second request"]
    if result["open_errors"]:
        out.append(f"- **failed while opening**: {result['open_errors']}")
    if result["second_request_errors"]:
        out.append(f"- **failed on the second request**: {result['second_request_errors']}")
    out += ["",
            "RSS counts the shared-memory segment (counters, analytics; `of which shmem`) in full "
            "in every process that maps it, and shared library pages too; Pss splits shared pages "
            "between the processes that map them; `private` (Private_Clean + Private_Dirty) is "
            "memory only this process holds, the figure that grows with connections. Kernel "
            "socket buffers are not process memory and appear in none of the columns."]
    return "\n".join(out) + "\n"


# --- setup ----------------------------------------------------------------------------------------

def ensure_tools(no_install: bool) -> None:
    # e2e.ensure_tools checks every tool in its table; this benchmark needs only these two.
    e2e.TOOLS = {tool: e2e.TOOLS[tool] for tool in ("nginx", "taskset")}
    e2e.ensure_tools(no_install)


def fd_limit_note(workers: list[int], connections: int, batch: int) -> tuple[str, bool]:
    """The workers' open-files limit, and whether it leaves room for their share of connections.
    fastgw does not raise its own RLIMIT_NOFILE: a worker inherits the supervisor's, which
    inherits the shell's (or LimitNOFILE= in the systemd unit)."""
    soft, hard = open_files_limit(workers[0])
    # SO_REUSEPORT spreads connections over the workers by a hash: roughly, not exactly, evenly.
    need = math.ceil(connections / len(workers)) + batch + WORKER_FD_HEADROOM
    enough = soft == resource.RLIM_INFINITY or soft >= need
    text = f"soft {soft}, hard {hard} (about {need} needed per worker)"
    return (text if enough else f"**{text}: too low, connections will fail; raise `ulimit -n` "
                                f"or pass --gateway-nofile**"), enough


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--connections", type=int, default=10000, help="keep-alive connections to hold")
    p.add_argument("--workers", type=int, default=1, help="fastgw workers")
    p.add_argument("--batch", type=int, default=500,
                   help="connections opened (and requests sent) at a time")
    p.add_argument("--gateway-nofile", type=int,
                   help="soft open-files limit for fastgw (as LimitNOFILE= in its systemd unit "
                        "would set); default: inherit this shell's")
    p.add_argument("--fastgw-cmd", help='command prefix for fastgw, e.g. "python -m fastgw run"; '
                                        "`-c CONFIG` is appended")
    p.add_argument("--json", type=Path, help="also write the samples here")
    p.add_argument("--no-install", action="store_true", help="never apt-get a missing nginx")
    args = p.parse_args(argv)
    if args.connections < 1 or args.workers < 1 or args.batch < 1:
        p.error("--connections, --workers and --batch must be positive")
    return args


def start_gateway(procs: e2e.Processes, tmp: Path, args) -> tuple[e2e.Started, int]:
    workload = e2e.make_workloads([2])[0]  # GET /s, 2-byte body
    origin_dir, fastgw_dir = tmp / "origin", tmp / "fastgw"
    origin_dir.mkdir()
    fastgw_dir.mkdir()
    origin_port, port = e2e.free_port(), e2e.free_port()
    conf = e2e.write_origin_config(origin_dir, origin_port, [2])
    try:
        e2e.start_service(procs, "origin", e2e.nginx_command(conf), origin_dir, origin_port,
                          ALL_CPUS, {}, [workload])
    except e2e.StartError as e:
        sys.exit(f"memory: the nginx origin did not start: {e}")
    prefix, env = e2e.fastgw_prefix(args.fastgw_cmd)
    argv = [*prefix, "-c", str(e2e.write_fastgw_config(fastgw_dir, port, origin_port,
                                                       args.workers))]
    inherited = resource.getrlimit(resource.RLIMIT_NOFILE)
    if args.gateway_nofile:
        set_soft_nofile(args.gateway_nofile)  # fastgw inherits it at exec
    try:
        # wait_ready inside: fastgw has answered GET /s through the origin at least once.
        started = e2e.start_service(procs, "fastgw", argv, fastgw_dir, port, ALL_CPUS, env,
                                    [workload])
    except e2e.StartError as e:
        sys.exit(f"memory: fastgw did not start: {e}")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, inherited)
    return started, origin_port


def run(args: argparse.Namespace, tmp: Path, procs: e2e.Processes) -> None:
    own_need = args.connections + OWN_FD_HEADROOM
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < own_need:
        sys.exit(f"memory: {args.connections} connections need about {own_need} open files in "
                 f"this script, but the hard limit is {hard}")
    fastgw, _ = start_gateway(procs, tmp, args)
    workers = wait_for_workers(fastgw.proc.pid, args.workers)
    if len(workers) != args.workers:
        sys.exit(f"memory: expected {args.workers} worker processes under fastgw "
                 f"(PID {fastgw.proc.pid}), found {len(workers)}")
    # Only now, so fastgw got the limit of the shell (or --gateway-nofile), not ours.
    set_soft_nofile(hard if hard != resource.RLIM_INFINITY else own_need)
    fd_note, _ = fd_limit_note(workers, args.connections, args.batch)
    print(f"fastgw PID {fastgw.proc.pid}, workers {workers}; worker open-files limit: {fd_note}",
          flush=True)

    info = {k: v for k, v in e2e.machine_info().items() if k not in ("haproxy", "wrk")}
    settings = {
        "settings": f"{args.workers} worker(s), {args.connections} keep-alive connections opened "
                    f"{args.batch} at a time, one `GET /s` (2-byte body from the nginx origin) "
                    f"on each, then a second one; nothing pinned",
        "worker open-files limit": fd_note,
    }
    result = asyncio.run(run_phases(fastgw.port, fastgw.proc.pid, workers, args))
    print("\n" + markdown_report(info, settings, result, args), flush=True)
    if args.json:
        args.json.write_text(json.dumps({
            "machine": info,
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "worker_open_files_limit": fd_note,
            **result,
        }, indent=2, default=str) + "\n")
        print(f"samples written to {args.json}")


def stop_at_deadline() -> None:
    """Whatever hangs, the run ends: SIGALRM unwinds to the cleanup like SIGTERM does."""
    def handler(signum, _frame):
        print(f"\nmemory: still running after {RUN_DEADLINE_S} s; stopping", file=sys.stderr)
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGALRM, handler)
    signal.alarm(RUN_DEADLINE_S)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_tools(args.no_install)
    stop_at_deadline()
    return e2e.run_and_clean_up("memory", lambda tmp, procs: run(args, tmp, procs))


if __name__ == "__main__":
    sys.exit(main())
