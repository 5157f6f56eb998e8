"""The supervisor: the process `fastgw run` starts. It owns the config, the shared-memory segment
and the admin listener, starts one worker process per core asked for, restarts a worker that dies,
forwards signals, and applies every config change to all workers or to none.

Workers are started with fork+exec (`python -m fastgw.server.worker`), not a bare fork: the
supervisor runs an event loop, and a forked copy of a running loop (epoll set, signal pipe, pending
callbacks) is a trap; an exec'd worker starts clean and maps the segment from an inherited fd.
"""
from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import uvloop

from fastgw._core.shm import Segment
from fastgw.config.errors import ConfigError, ConfigProblem, ConfigWriteError
from fastgw.config.load import LoadedConfig
from fastgw.config.store import ConfigStore
from fastgw.log import configure_log, log, log_loop_exception, log_uncaught
from fastgw.runtime.load import CHECKS
from fastgw.server import systemd
from fastgw.server.cluster import ClusterSync, ConfigSync, cluster_interval
from fastgw.server.control import WORKER_RUNNING, WORKER_STARTING, ControlChannel
from fastgw.server.control_plane import AdminHandle, ControlPlane, StartAdmin
from fastgw.server.dns import Resolver
from fastgw.server.health import HealthChecker
from fastgw.server.ports import busy_listeners

APPLY_TIMEOUT = 30.0          # a worker that cannot compile and bind in this long fails the change
START_TIMEOUT = 60.0
HUNG_AFTER = 30.0             # no heartbeat for this long: the worker's loop is stuck, replace it
RESTART_BACKOFF_MAX = 30.0


def worker_count(requested) -> int:
    if requested == "auto":
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:            # macOS
            return os.cpu_count() or 1
    return int(requested)


class SlotTable:
    """Stable shared-memory slot numbers per route, target and listener name. A name keeps its
    slot for the life of the supervisor (a route removed and added again continues its counters);
    names beyond the capacity get -1 (not counted) and a warning."""

    def __init__(self, capacity: dict):
        self.capacity = capacity
        self.routes: dict[str, int] = {}
        self.targets: dict[tuple[str, str], int] = {}
        self.listeners: dict[str, int] = {}
        self._warned: set[str] = set()

    def assign(self, config) -> dict:
        routes = {r.name: self._slot(self.routes, r.name, "routes", first=1) for r in config.routes}
        targets = {(name, t.address): self._slot(self.targets, (name, t.address), "targets")
                   for name, svc in config.services.items() for t in svc.targets
                   if t.address is not None}     # an unresolved name has no address to count
        listeners = {spec.name: self._slot(self.listeners, spec.name, "listeners")
                     for spec in config.listeners}
        return {"routes": routes, "targets": targets, "listeners": listeners}

    def _slot(self, table: dict, key, kind: str, first: int = 0) -> int:
        slot = table.get(key)
        if slot is None:
            slot = first + len(table)
            if slot >= self.capacity[kind]:
                if kind not in self._warned:
                    self._warned.add(kind)
                    log(f"shared-memory {kind} table is full ({self.capacity[kind]}): "
                        f"new {kind} are served but not counted until a restart", "warning")
                return -1
            table[key] = slot
        return slot


@dataclass
class WorkerHandle:
    index: int
    process: subprocess.Popen | None = None
    channel: ControlChannel | None = None
    version: int = 0                          # the config version it runs
    running: bool = False
    started: float = 0.0
    restarts: int = 0
    replies: asyncio.Queue = field(default_factory=asyncio.Queue)


class Supervisor(ControlPlane):
    def __init__(self, loaded: LoadedConfig, workers=None, start_admin: StartAdmin | None = None):
        self.loop = asyncio.get_running_loop()
        self.start_admin = start_admin         # the admin API, given by the CLI (server/control_plane.py)
        self.store = ConfigStore(loaded, CHECKS)
        config = loaded.config
        self.count = worker_count(workers if workers is not None else config.workers)
        self.segment = Segment.create(
            workers=self.count, routes=max(1024, 2 * len(config.routes) + 1),
            targets=max(1024, 2 * sum(len(s.targets) for s in config.services.values())),
            listeners=64)
        self.slots = SlotTable(self.segment.capacity)
        self.dns = Resolver(config.dns)
        self.running = config                  # what the workers run: names resolved (server/dns.py)
        self.current_slots: dict = {}          # assigned in run(), once the names are resolved
        self.segment.config_version = self.store.version
        self.workers = [WorkerHandle(i) for i in range(self.count)]
        self.change_lock = asyncio.Lock()      # one admin change or reload at a time
        self.apply_lock = asyncio.Lock()       # one config switch or worker start at a time
        self.reloads = {"ok": 0, "error": 0}
        self.last_reload = {"version": self.store.version, "ok": True, "at": time.time(), "error": None}
        self.started = time.time()
        self.stopping = False
        self.draining = False
        self.done = asyncio.Event()
        self.exit_code = 0
        self.admin: AdminHandle | None = None
        self.health = HealthChecker(self.segment)
        self.cluster: ClusterSync | None = None
        self.config_sync: ConfigSync | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> int:
        configure_log(self.store.loaded.config.log)
        self.loop.set_exception_handler(log_loop_exception)
        for sig, handler in ((signal.SIGHUP, self._on_sighup), (signal.SIGTERM, self.drain),
                             (signal.SIGQUIT, self.drain), (signal.SIGINT, self.stop),
                             (signal.SIGUSR1, self._forward_usr1)):
            self.loop.add_signal_handler(sig, handler)
        # uvloop keeps SIGCHLD for itself, so children are collected by polling, and at once when
        # a worker's control channel closes (which is how its death is usually noticed first).
        self.loop.create_task(self._reap_periodically())
        busy = busy_listeners(self.store.loaded.config.listeners)
        for _, bind in busy:
            log(f"{bind}: address already in use", "error")
        await self.dns.resolve_new(self.store.loaded.config)
        self.running = self.dns.expand(self.store.loaded.config)
        self.current_slots = self.slots.assign(self.running)
        started = [] if busy else await asyncio.gather(*(self._start_worker(w) for w in self.workers))
        if busy:
            self.stop()
            self.exit_code = 1
        elif not all(started):
            log("workers failed to start", "error")
            self.stop()
            self.exit_code = 1
        else:
            self.health.apply(self.running, self.current_slots)
            self.loop.create_task(self._refresh_dns())
            self._apply_cluster(self.store.loaded.config)
            cluster = self.store.loaded.config.cluster
            if cluster is not None and cluster.config_sync:
                self.config_sync = ConfigSync(self, cluster)
                self.config_sync.start()
            await self._start_admin()
            log(f"{self.count} worker{'s' if self.count > 1 else ''} running config version "
                f"{self.store.version}")
            systemd.notify("READY=1", f"STATUS=serving, config version {self.store.version}")
            self.loop.create_task(self._watch_heartbeats())
        await self.done.wait()
        self.health.close()
        if self.cluster is not None:
            await self.cluster.close()
        if self.config_sync is not None:
            await self.config_sync.close()
        if self.admin is not None:
            await self.admin.close()
        self.segment.close()
        return self.exit_code

    def _apply_cluster(self, config) -> None:
        """Start, restart or stop the cluster rate-limit sync to match `config`."""
        interval = cluster_interval(config)
        current = self.cluster
        if current is not None and interval is not None and current.interval == interval and \
                current.spec == config.cluster:
            return
        if current is not None:
            self.loop.create_task(current.close())
            self.cluster = None
        if interval is not None:
            self.cluster = ClusterSync(self.segment, config.cluster, interval)
            self.cluster.start()

    async def _start_admin(self) -> None:
        spec = self.store.loaded.config.admin
        if spec is None:
            return
        if self.start_admin is None:
            log(f"admin listener on {spec.bind}: this process has no admin API to start", "error")
            self.stop()
            self.exit_code = 1
            return
        try:
            self.admin = await self.start_admin(self, spec)
        except OSError as exc:
            log(f"admin listener on {spec.bind}: {exc.strerror or exc}", "error")
            self.stop()
            self.exit_code = 1

    async def _start_worker(self, w: WorkerHandle) -> bool:
        """Start one worker on the current config; True once it serves."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [child.fileno(), self.segment.fd]
        try:
            w.process = subprocess.Popen(
                [sys.executable, "-m", "fastgw.server.worker", "--index", str(w.index),
                 "--control-fd", str(child.fileno()), "--shm-fd", str(self.segment.fd)],
                pass_fds=fds, start_new_session=False)
        finally:
            child.close()
        w.started = time.monotonic()
        w.running = False
        w.replies = asyncio.Queue()
        w.channel = await ControlChannel.open(parent)
        self.segment.worker_set(w.index, pid=w.process.pid, config_version=0, state=WORKER_STARTING,
                                generation=w.restarts)
        version = self.store.version
        w.channel.send("start", version, self.running, self.current_slots)
        self.loop.create_task(self._read_replies(w, w.channel))
        reply = await self._reply(w, START_TIMEOUT)
        if reply is None or reply[0] != "ready":
            why = reply[2] if reply is not None and len(reply) > 2 else "no answer"
            log(f"worker {w.index} failed to start: {why}", "error")
            return False
        w.version, w.running = reply[1], True
        return True

    async def _read_replies(self, w: WorkerHandle, channel: ControlChannel) -> None:
        while True:
            message = await channel.receive()
            if channel is not w.channel:
                return                    # a replaced worker's channel
            await w.replies.put(message)
            if message is None:
                self.loop.call_later(0.01, self._reap)
                return

    async def _reply(self, w: WorkerHandle, timeout: float):
        try:
            return await asyncio.wait_for(w.replies.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _reap_periodically(self) -> None:
        while not self.done.is_set():
            self._reap()
            await asyncio.sleep(0.25)

    def _reap(self) -> None:
        """Collect every exited child (as PID 1 in a container that includes orphans
        re-parented to us) and restart workers that died while we were not stopping."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for w in self.workers:
                if w.process is not None and w.process.pid == pid:
                    w.process.returncode = os.waitstatus_to_exitcode(status)
                    self._worker_exited(w)
        # (a non-worker child is simply reaped)

    def _worker_exited(self, w: WorkerHandle) -> None:
        code = w.process.returncode
        w.running = False
        if w.channel is not None:
            w.channel.close()
        self.segment.worker_set(w.index, pid=0, config_version=0, state=0)
        if self.stopping:
            if all(x.process is None or x.process.returncode is not None for x in self.workers):
                self.done.set()
            return
        uptime = time.monotonic() - w.started
        # A worker that keeps dying right after start must not spin the CPU.
        delay = 0.0 if uptime > 10 else min(RESTART_BACKOFF_MAX, 0.5 * 2 ** min(w.restarts, 6))
        log(f"worker {w.index} (pid {w.process.pid}) exited with {_describe(code)}; "
            f"restarting in {delay:.1f}s", "error")
        w.restarts += 1
        self.loop.call_later(delay, lambda: self.loop.create_task(self._restart(w)))

    async def _restart(self, w: WorkerHandle) -> None:
        if self.stopping:
            return
        async with self.apply_lock:           # it must start on the config everyone runs
            if await self._start_worker(w):
                log(f"worker {w.index} restarted (pid {w.process.pid})")
            else:                             # hung or broken: kill it, the reaper tries again
                _signal(w, signal.SIGKILL)

    async def _watch_heartbeats(self) -> None:
        while not self.stopping:
            await asyncio.sleep(1.0)
            for info in self.segment.workers():
                w = self.workers[info["index"]]
                if (w.running and info["state"] == WORKER_RUNNING
                        and info["heartbeat_age_s"] > HUNG_AFTER):
                    log(f"worker {w.index} (pid {info['pid']}) has not run its loop for "
                        f"{info['heartbeat_age_s']:.0f}s; killing it", "error")
                    w.running = False
                    _signal(w, signal.SIGKILL)

    # --- config changes --------------------------------------------------------------------------

    async def apply(self, loaded: LoadedConfig, *, persist: bool = True) -> int:
        """Make `loaded` the running config everywhere, or nowhere: every worker compiles it and
        binds new listeners (prepare); only when all succeeded is it persisted and switched on
        (commit). Raises ConfigError (nothing changed) when a worker refuses it."""
        async with self.apply_lock:
            ours = {spec.bind for spec in self.store.loaded.config.listeners}
            busy = busy_listeners(loaded.config.listeners, ours)
            if busy:
                raise ConfigError([ConfigProblem(f"listeners[{i}].bind", f"{bind}: address already in use",
                                                 file=loaded.path or "<config>")
                                   for i, bind in busy])
            version = self.store.version + 1
            self.dns.configure(loaded.config.dns)
            await self.dns.resolve_new(loaded.config)
            running = self.dns.expand(loaded.config)
            slots, live = await self._prepare(version, running)
            try:
                self.store.commit(loaded) if persist else self.store.adopt(loaded)
            except BaseException:             # not written (ConfigWriteError): not applied either
                self._abort(live, version)
                raise
            await self._commit(live, version, running, slots)
            self.dns.forget_others(loaded.config)
            self.segment.config_version = version
            self._apply_cluster(loaded.config)
            configure_log(loaded.config.log)
            if self.admin is not None:
                self.admin.configure(loaded.config.admin)
            return version

    async def _prepare(self, version: int, running) -> tuple[dict, list[WorkerHandle]]:
        """Every live worker compiles `running` and binds its new listeners -> (slots, workers);
        ConfigError (and nothing changed) when one refuses."""
        slots = self.slots.assign(running)
        for slot in set(slots["targets"].values()) - set(self.current_slots["targets"].values()):
            if slot >= 0:
                self.segment.target_added(slot)
        live = [w for w in self.workers if w.running]
        for w in live:
            w.channel.send("prepare", version, running, slots)
        replies = await asyncio.gather(*(self._reply(w, APPLY_TIMEOUT) for w in live))
        refused = [(w, r) for w, r in zip(live, replies) if r is None or r[0] != "prepared"]
        if refused:
            self._abort(live, version)
            w, reply = refused[0]
            why = reply[2] if reply is not None and len(reply) > 2 else "no answer in time"
            raise ConfigError([ConfigProblem("", f"worker {w.index}: {why}")])
        return slots, live

    async def _commit(self, live: list[WorkerHandle], version: int, running, slots: dict) -> None:
        for w in live:
            w.channel.send("commit", version)
        await asyncio.gather(*(self._reply(w, APPLY_TIMEOUT) for w in live))
        for w in live:
            w.version = version
        self.running, self.current_slots = running, slots
        self.health.apply(running, slots)

    async def _refresh_dns(self) -> None:
        """Re-resolve each name when its time comes; a change of addresses is applied to the
        workers like an admin change of targets (same config version): an address that went away
        is removed and drains, its in-flight requests finish."""
        while not self.stopping:
            due = self.dns.next_due()
            await asyncio.sleep(1.0 if due is None else max(0.05, due - time.monotonic()))
            await self.dns.refresh_due()
            if self.stopping:
                continue
            async with self.apply_lock:
                self.dns.forget_others(self.store.loaded.config)
                running = self.dns.expand(self.store.loaded.config)
                if running == self.running:
                    continue
                version = self.store.version
                try:
                    slots, live = await self._prepare(version, running)
                except ConfigError as exc:  # the workers keep the addresses they had; retried
                    log(f"resolved addresses not applied: {exc}", "error")
                    continue
                await self._commit(live, version, running, slots)

    async def purge_cache(self, spec: dict) -> int:
        """Remove cached answers in every worker (POST /cache/purge) -> how many entries."""
        async with self.apply_lock:           # replies come back in order, not among a config's
            live = [w for w in self.workers if w.running]
            for w in live:
                w.channel.send("purge", 0, spec)
            replies = await asyncio.gather(*(self._reply(w, APPLY_TIMEOUT) for w in live))
        return sum(r[2] for r in replies if r is not None and r[0] == "purged")

    def _abort(self, live: list[WorkerHandle], version: int) -> None:
        for w in live:
            if w.running:
                w.channel.send("abort", version)

    async def reload(self) -> int:
        """Re-read the config file, validate, apply (SIGHUP, POST /reload, `fastgw reload`)."""
        systemd.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            async with self.change_lock:
                loaded = self.store.read_file()
                version = await self.apply(loaded, persist=False)
        except ConfigError as exc:
            self._record_reload(False, str(exc))
            log(f"reload rejected, config version {self.store.version} keeps running:\n{exc}", "error")
            raise
        finally:
            systemd.notify("READY=1", f"STATUS=serving, config version {self.store.version}")
        self._record_reload(True, None)
        log(f"config reloaded: version {version}")
        return version

    async def change(self, edit) -> int:
        """An admin change: `edit()` returns the new document (computed under the lock, so two
        concurrent changes cannot both start from the same version); validate, apply, persist."""
        async with self.change_lock:
            loaded = self.store.validate(edit())
            try:
                version = await self.apply(loaded)
            except (ConfigError, ConfigWriteError) as exc:
                self._record_reload(False, str(exc))
                raise
        self._record_reload(True, None)
        log(f"config changed through the admin API: version {version}")
        if self.config_sync is not None:
            await self.config_sync.publish(self.store.document)
        return version

    def _record_reload(self, ok: bool, error: str | None) -> None:
        self.reloads["ok" if ok else "error"] += 1
        self.last_reload = {"version": self.store.version, "ok": ok, "at": time.time(), "error": error}

    def _on_sighup(self) -> None:
        async def reload():
            try:
                await self.reload()
            except ConfigError:
                pass                      # logged; the running config stays
        self.loop.create_task(reload())

    # --- status ----------------------------------------------------------------------------------

    def ready(self) -> bool:
        """Every worker is up and runs the current config, and we are not draining."""
        return (not self.draining and not self.stopping
                and all(w.running and w.version == self.store.version for w in self.workers))

    def workers_running(self) -> int:
        return sum(1 for w in self.workers if w.running)

    def dns_state(self, target) -> str | None:
        return self.dns.state(target)

    def status(self) -> dict:
        beats = {info["index"]: info for info in self.segment.workers()}
        return {
            "status": "draining" if self.draining else "ok",
            "ready": self.ready(),
            "config_version": self.store.version,
            "uptime_s": round(time.time() - self.started, 3),
            "reload": self.last_reload,
            "workers": [{
                "index": w.index,
                "pid": w.process.pid if w.process is not None else None,
                "running": w.running,
                "config_version": w.version,
                "restarts": w.restarts,
                "heartbeat_age_s": round(beats[w.index]["heartbeat_age_s"], 3) if w.index in beats else None,
                "requests": beats[w.index]["requests"] if w.index in beats else 0,
            } for w in self.workers],
        }

    # --- stopping --------------------------------------------------------------------------------

    def drain(self) -> None:
        """SIGTERM/SIGQUIT: not ready at once, then after drain.delay the workers stop accepting
        and finish in-flight requests (up to drain.timeout); exit 0 when they are all gone."""
        if self.draining or self.stopping:
            return
        self.draining = True
        systemd.notify("STOPPING=1")
        drain = self.store.loaded.config.drain
        log(f"draining (delay {drain.delay:g}s, timeout {drain.timeout:g}s)")

        async def go():
            await asyncio.sleep(drain.delay)
            self.stopping = True
            for w in self.workers:
                _signal(w, signal.SIGTERM)
            await asyncio.sleep(drain.timeout + 5.0)
            for w in self.workers:            # a worker stuck past its own deadline
                _signal(w, signal.SIGKILL)
        self.loop.create_task(go())
        self._done_if_no_workers()

    def stop(self) -> None:
        """SIGINT: stop now."""
        self.stopping = True
        systemd.notify("STOPPING=1")
        for w in self.workers:
            _signal(w, signal.SIGINT)
        self._done_if_no_workers()

    def _done_if_no_workers(self) -> None:
        if all(w.process is None or w.process.returncode is not None for w in self.workers):
            self.done.set()

    def _forward_usr1(self) -> None:
        for w in self.workers:
            _signal(w, signal.SIGUSR1)


def _signal(w: WorkerHandle, sig: int) -> None:
    if w.process is not None and w.process.returncode is None:
        try:
            os.kill(w.process.pid, sig)
        except ProcessLookupError:
            pass


def _describe(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def raise_open_files_limit() -> int:
    """Every client and upstream connection is a file descriptor, and the usual soft limit (1,024)
    would cap a worker far below `limits.max_connections`. Raise the soft limit to the hard one,
    as HAProxy does; the workers inherit it. The hard limit stays the administrator's choice
    (systemd's LimitNOFILE). Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass          # macOS: an unlimited hard limit is refused above OPEN_MAX; keep the soft one
    return soft


def serve(loaded: LoadedConfig, workers=None, start_admin: StartAdmin | None = None) -> int:
    """Run the gateway until a stop signal; returns the exit code. `start_admin` starts the admin
    API when the config has `admin:` (the CLI passes fastgw.admin.api.start_admin)."""
    configure_log(loaded.config.log)
    sys.excepthook = log_uncaught
    log(f"open files limit: {raise_open_files_limit()}", "debug")

    async def main() -> int:
        return await Supervisor(loaded, workers, start_admin).run()

    try:
        return uvloop.run(main())
    except OSError as exc:
        log(f"cannot start: {exc}", "error")
        return 1
