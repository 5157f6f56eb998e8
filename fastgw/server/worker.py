"""One worker process: its own uvloop, SO_REUSEPORT listeners, and the config the supervisor sends.

The supervisor (fastgw/server/supervisor.py) starts each worker as
`python -m fastgw.server.worker --index I --control-fd C --shm-fd S` and talks to it over the
control channel: the worker compiles and opens what a config needs in `prepare` and swaps it in
on `commit`, so a reload applies in every worker or in none. Signals: SIGTERM/SIGQUIT drain,
SIGINT stops at once, SIGUSR1 reopens log files; SIGHUP is the supervisor's (ignored here).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import socket
import sys
from dataclasses import dataclass

import uvloop

from fastgw._core.protocol import ListenerState
from fastgw._core.proxyproto import trusted_networks
from fastgw._core.shm import Segment
from fastgw._core.tcp import TcpListenerState
from fastgw.config.validate import parse_bind
from fastgw.log import configure_log, log, log_loop_exception, log_uncaught, set_process
from fastgw.runtime.build import Runtime, compile_config
from fastgw.server.accesslog import open_access_log
from fastgw.server.control import WORKER_DRAINING, WORKER_RUNNING, ControlChannel
from fastgw.tls import ServerTls
from fastgw.server.tracing import open_tracer

HEARTBEAT_INTERVAL = 1.0


@dataclass
class OpenListener:
    spec: object                  # config.model.Listener
    state: object                 # fastgw._core.protocol.ListenerState, or tcp.TcpListenerState
    server: asyncio.AbstractServer
    tls: ServerTls | None = None  # https listeners that terminate TLS


@dataclass
class Pending:
    """A prepared config: compiled, its new listeners already bound, not yet serving."""
    version: int
    config: object
    runtime: Runtime
    slots: dict
    opened: dict                  # name -> OpenListener bound for this config
    certificates: dict            # name -> certificate set loaded for a kept https listener


def _kind(spec) -> str:
    """What serves a listener: http (plain or TLS-terminating) or Layer 4 (tcp, TLS passthrough)."""
    if spec.protocol == "tcp" or (spec.tls is not None and spec.tls.passthrough):
        return "l4"
    return spec.protocol


class Worker:
    def __init__(self, index: int, channel: ControlChannel, segment):
        self.index = index
        self.channel = channel
        self.segment = segment
        self.loop = asyncio.get_running_loop()
        self.loop.set_exception_handler(log_loop_exception)
        self.version = 0
        self.config = None
        self.runtime: Runtime | None = None
        self.access_log = None
        self.tracer = None
        self.listeners: dict[str, OpenListener] = {}
        self.pending: Pending | None = None
        self.stopped = asyncio.Event()
        self.draining = False

    # --- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> int:
        message = await self.channel.receive()
        if message is None or message[0] != "start":
            return 1
        _, version, config, slots = message
        try:
            self._commit(await self._prepare(version, config, slots))
        except Exception as exc:          # nothing serves yet: report and let the supervisor decide
            self.channel.send("failed", version, f"{type(exc).__name__}: {exc}")
            await self.channel.flush()
            return 1
        self.segment.worker_set(self.index, pid=os.getpid(), config_version=version, state=WORKER_RUNNING)
        self.channel.send("ready", version)
        # Everything allocated so far lives as long as the worker: keep it out of the cyclic GC's
        # scans (per-request objects are freed by reference counting).
        gc.freeze()
        for sig, handler in ((signal.SIGTERM, self.drain), (signal.SIGQUIT, self.drain),
                             (signal.SIGINT, self.stop), (signal.SIGUSR1, self.reopen_logs),
                             (signal.SIGHUP, lambda: None)):
            self.loop.add_signal_handler(sig, handler)
        self._heartbeat()
        control = self.loop.create_task(self._serve_control())
        await self.stopped.wait()
        control.cancel()
        if self.access_log is not None:
            self.access_log.close()
        if self.tracer is not None:
            self.tracer.close()
        if self.runtime is not None:
            self.runtime.close()
        return 0

    def _heartbeat(self) -> None:
        self.segment.worker_heartbeat(self.index)
        if not self.stopped.is_set():
            self.loop.call_later(HEARTBEAT_INTERVAL, self._heartbeat)

    async def _serve_control(self) -> None:
        while True:
            message = await self.channel.receive()
            if message is None:           # the supervisor is gone: do not linger as an orphan
                log("supervisor gone, draining", "warning")
                self.drain()
                return
            kind, version = message[0], message[1]
            if kind == "prepare":
                if self.pending is not None:
                    self._discard(self.pending)
                try:
                    self.pending = await self._prepare(version, message[2], message[3])
                except Exception as exc:
                    self.channel.send("rejected", version, f"{type(exc).__name__}: {exc}")
                else:
                    self.channel.send("prepared", version)
            elif kind == "commit" and self.pending is not None and self.pending.version == version:
                pending, self.pending = self.pending, None
                self._commit(pending)
                self.channel.send("applied", version)
            elif kind == "purge":
                self.channel.send("purged", version, self._purge_cache(message[2]))
            elif kind == "abort" and self.pending is not None and self.pending.version == version:
                self._discard(self.pending)
                self.pending = None

    def _purge_cache(self, spec: dict) -> int:
        caches = {id(p.response_cache): p.response_cache for p in self.runtime.plugins.values()
                  if hasattr(p, "response_cache")} if self.runtime is not None else {}
        return sum(cache.purge(**spec) for cache in caches.values())

    # --- applying a config -----------------------------------------------------------------------

    async def _prepare(self, version: int, config, slots: dict) -> Pending:
        runtime = compile_config(config, slots=slots, previous=self.runtime)
        opened: dict[str, OpenListener] = {}
        certificates: dict[str, tuple] = {}
        try:
            for spec in config.listeners:
                current = self.listeners.get(spec.name)
                if current is None or current.spec.bind != spec.bind or _kind(current.spec) != _kind(spec):
                    opened[spec.name] = await self._open(spec, runtime, slots)
                elif current.tls is not None:
                    # Certificate files are read again on every reload (SIGHUP after renewing them).
                    certificates[spec.name] = ServerTls.prepare(spec.tls)
        except BaseException:
            for item in opened.values():
                item.server.close()
            runtime.close(successor=self.runtime)
            raise
        return Pending(version, config, runtime, slots, opened, certificates)

    async def _open(self, spec, runtime: Runtime, slots: dict) -> OpenListener:
        host, port = parse_bind(spec.bind)
        tls = None
        if _kind(spec) == "l4":               # tcp, or https passed through by SNI
            state = TcpListenerState(spec.name, None, loop=self.loop)
        else:
            state = ListenerState(spec.name, runtime.router, loop=self.loop)
            if spec.protocol == "https":
                tls = ServerTls(spec.tls)
                state.scheme = b"https"
        _configure(state, spec, slots)
        # Not serving until commit: a prepared config that is aborted never takes a connection.
        server = await self.loop.create_server(
            state.protocol_factory, host or None, port, reuse_port=True, backlog=4096,
            start_serving=False, ssl=tls.outer if tls is not None else None,
            ssl_handshake_timeout=spec.limits.header_timeout if tls is not None else None)
        return OpenListener(spec, state, server, tls)

    def _commit(self, pending: Pending) -> None:
        config, runtime = pending.config, pending.runtime
        old_runtime, old_config = self.runtime, self.config
        configure_log(config.log)
        if old_config is None or old_config.log.access != config.log.access:
            if self.access_log is not None:
                self.access_log.close()
            self.access_log = open_access_log(self.loop, config.log.access)
        if old_config is None or old_config.tracing != config.tracing:
            if self.tracer is not None:
                self.tracer.close()
            self.tracer = open_tracer(config.tracing)
        wanted = {spec.name: spec for spec in config.listeners}
        for name in list(self.listeners):
            item = self.listeners[name]
            if name not in wanted or name in pending.opened:
                del self.listeners[name]
                self._retire(item)
        for name, spec in wanted.items():
            item = self.listeners.get(name) or pending.opened[name]
            item.spec = spec
            if name in pending.certificates:
                item.tls.apply(pending.certificates[name])
            if _kind(spec) == "l4":
                item.state.service = runtime.services.get(spec.service)
                item.state.route_sni(spec.tls.sni_routes if spec.tls else {}, runtime.services)
            else:
                item.state.router = runtime.router
                item.state.access_log = self.access_log
                item.state.tracer = self.tracer
                item.state.trace_sample_ratio = config.tracing.sample_ratio
            _configure(item.state, spec, pending.slots)
            if name in pending.opened:
                self.listeners[name] = item
                self.loop.create_task(item.server.start_serving())
                log(f"listener {name} on {spec.protocol}://{spec.bind}" +
                    (f" -> service {spec.service}" if spec.protocol == "tcp" else ""),
                    "debug" if self.index else "info")
        self.runtime, self.config, self.version = runtime, config, pending.version
        self.segment.worker_applied(self.index, pending.version)
        if old_runtime is not None:
            # Idle pooled connections of the old services close; busy ones finish their request
            # (a request keeps the route and service objects it started with).
            self.loop.call_later(1.0, old_runtime.close, runtime)

    def _discard(self, pending: Pending) -> None:
        for item in pending.opened.values():
            item.server.close()
        pending.runtime.close(successor=self.runtime)

    def _retire(self, item: OpenListener) -> None:
        item.server.close()
        item.state.draining = True
        item.state.close_idle_connections()

    # --- signals ---------------------------------------------------------------------------------

    def reopen_logs(self) -> None:
        if self.access_log is not None:
            self.access_log.reopen()

    def drain(self) -> None:
        """SIGTERM: stop accepting, answer what is in flight (Connection: close), then exit."""
        if self.draining:
            return
        self.draining = True
        self.segment.worker_set(self.index, pid=os.getpid(), config_version=self.version,
                                state=WORKER_DRAINING)
        for item in self.listeners.values():
            item.server.close()
            item.state.draining = True
            item.state.close_idle_connections()
        timeout = self.config.drain.timeout if self.config is not None else 30.0
        self.loop.create_task(self._wait_drained(timeout))

    async def _wait_drained(self, timeout: float) -> None:
        deadline = self.loop.time() + timeout
        while self.loop.time() < deadline:
            if all(item.state.open_connections == 0 for item in self.listeners.values()):
                break
            await asyncio.sleep(0.05)
        self.stopped.set()

    def stop(self) -> None:
        for item in self.listeners.values():
            item.server.close()
        self.stopped.set()


def _configure(state, spec, slots: dict) -> None:
    limits = spec.limits
    state.configure(
        max_header_bytes=limits.max_header_bytes, max_headers=limits.max_headers,
        max_url_bytes=limits.max_url_bytes, max_body_bytes=limits.max_body_bytes,
        header_timeout=limits.header_timeout, idle_timeout=limits.idle_timeout,
        body_timeout=limits.body_timeout, max_connections=limits.max_connections, accept_proxy=bool(spec.proxy_protocol),
        proxy_trusted=trusted_networks(getattr(spec.proxy_protocol, "trusted", None)),
        proxy_untrusted_plain=getattr(spec.proxy_protocol, "untrusted", None) == "plain",
        keep_escaped_slashes=spec.escaped_slashes == "keep",
        metric_slot=slots.get("listeners", {}).get(spec.name, -1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastgw-worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--shm-fd", type=int, required=True)
    args = parser.parse_args(argv)
    set_process(f"worker {args.index}")
    sys.excepthook = log_uncaught
    segment = Segment.attach(args.shm_fd)
    segment.activate(args.index)
    sock = socket.socket(fileno=args.control_fd)

    async def run() -> int:
        channel = await ControlChannel.open(sock)
        return await Worker(args.index, channel, segment).run()

    try:
        return uvloop.run(run())
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
