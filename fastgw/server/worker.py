"""One worker process: an event loop (uvloop), the listeners, reload and graceful stop."""
from __future__ import annotations

import asyncio
import gc
import signal
import sys

import uvloop

from fastgw.config.compile import Runtime, compile_config
from fastgw.config.errors import ConfigError
from fastgw.config.validate import parse_bind
from fastgw.server.accesslog import open_access_log


LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_threshold = LEVELS["info"]


def log(message: str, level: str = "info") -> None:
    if LEVELS[level] >= _threshold:
        print(f"fastgw: {message}", file=sys.stderr, flush=True)


def set_log_level(level: str) -> None:
    global _threshold
    _threshold = LEVELS[level]


class Worker:
    def __init__(self, loaded):
        self.loaded = loaded
        self.loop = asyncio.get_running_loop()
        self.runtime: Runtime = compile_config(loaded.config)
        self.access_log = open_access_log(self.loop, loaded.config.log.access)
        self.listeners = {}          # name -> ListenerState
        self.servers = []
        self.stopped = asyncio.Event()
        self.exit_code = 0

    async def start(self) -> None:
        from fastgw._core.protocol import ListenerState

        for spec in self.loaded.config.listeners:
            host, port = parse_bind(spec.bind)
            limits = spec.limits
            state = ListenerState(
                spec.name, self.runtime.router, max_header_bytes=limits.max_header_bytes,
                max_headers=limits.max_headers, max_url_bytes=limits.max_url_bytes,
                max_body_bytes=limits.max_body_bytes, header_timeout=limits.header_timeout,
                idle_timeout=limits.idle_timeout, max_connections=limits.max_connections,
                access_log=self.access_log, loop=self.loop)
            server = await self.loop.create_server(
                state.protocol_factory, host or None, port, reuse_port=True, backlog=4096)
            self.listeners[spec.name] = state
            self.servers.append(server)
            log(f"listener {spec.name} on http://{spec.bind}")
        # Everything allocated so far lives as long as the worker: keep it out of the cyclic GC's
        # scans (per-request objects are freed by reference counting).
        gc.freeze()
        for sig, handler in ((signal.SIGTERM, self.drain), (signal.SIGQUIT, self.drain),
                             (signal.SIGINT, self.stop), (signal.SIGHUP, self.reload),
                             (signal.SIGUSR1, self.reopen_logs)):
            self.loop.add_signal_handler(sig, handler)

    def reload(self) -> None:
        """Validate, then swap the routing tables; a request in flight keeps the ones it has."""
        from fastgw.config.load import load_config

        try:
            loaded = load_config(self.loaded.path)
            runtime = compile_config(loaded.config)
        except ConfigError as exc:
            log(f"reload rejected, the running config stays:\n{exc}", "error")
            return
        old, self.runtime, self.loaded = self.runtime, runtime, loaded
        set_log_level(loaded.config.log.level)
        for state in self.listeners.values():
            state.router = runtime.router
        # Idle pooled connections of the old services are closed; busy ones finish their request.
        self.loop.call_later(1.0, old.close)
        log("config reloaded")

    def reopen_logs(self) -> None:
        if self.access_log is not None:
            self.access_log.reopen()

    def drain(self) -> None:
        """SIGTERM: stop accepting, answer what is in flight (Connection: close), then exit."""
        log("draining")
        for server in self.servers:
            server.close()
        for state in self.listeners.values():
            state.draining = True
            state.close_idle_connections()
        self.loop.create_task(self._wait_drained(30.0))

    async def _wait_drained(self, timeout: float) -> None:
        deadline = self.loop.time() + timeout
        while self.loop.time() < deadline:
            if all(state.open_connections == 0 for state in self.listeners.values()):
                break
            await asyncio.sleep(0.05)
        self.stopped.set()

    def stop(self) -> None:
        for server in self.servers:
            server.close()
        self.stopped.set()

    async def run(self) -> int:
        await self.start()
        await self.stopped.wait()
        if self.access_log is not None:
            self.access_log.close()
        self.runtime.close()
        return self.exit_code


def serve(loaded, workers=None) -> int:
    """Run the gateway in this process until a stop signal; returns the exit code."""
    requested = workers if workers is not None else loaded.config.workers
    if requested != 1:
        log(f"workers: {requested}: this version runs exactly one worker process", "error")
        return 2
    set_log_level(loaded.config.log.level)

    async def main() -> int:
        return await Worker(loaded).run()

    try:
        return uvloop.run(main())
    except OSError as exc:
        log(f"cannot start: {exc}", "error")
        return 1
