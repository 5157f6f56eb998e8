"""Active health checks, run by the supervisor: once per host, not once per worker.

Each checked target has one task that probes it every `interval` (an HTTP GET whose status must be
in `expect_status`, a TCP connect, or grpc.health.v1 Check) and flips the target's `healthy` word in shared memory after
`unhealthy_threshold` failures or `healthy_threshold` successes in a row; the workers' balancers
read that word on every pick, so they all agree within one check.
"""
from __future__ import annotations

import asyncio

from fastgw.log import log
from fastgw.tls import client_context


class HealthChecker:
    def __init__(self, segment):
        self.segment = segment
        self.tasks: dict[tuple[str, str], tuple[object, int, asyncio.Task]] = {}

    def apply(self, config, slots: dict) -> None:
        """Start, keep or stop checks to match `config` (called at start and after each change)."""
        wanted = {}
        for name, service in config.services.items():
            spec = service.health.active
            tls = service.tls if service.scheme == "https" else None
            for target in service.targets if spec is not None else ():
                slot = slots["targets"].get((name, target.address), -1)
                if slot >= 0:
                    # A target resolved from a DNS name is verified (TLS) under that name.
                    server_name = target.dns.name if target.dns is not None else None
                    wanted[(name, target.address)] = (spec, slot, tls, server_name)
        for key, (spec, slot, tls, server_name, task) in list(self.tasks.items()):
            if wanted.get(key) != (spec, slot, tls, server_name):
                task.cancel()
                del self.tasks[key]
                if key not in wanted:
                    self.segment.target_set_healthy(slot, True)   # unchecked targets count as up
        for key, (spec, slot, tls, server_name) in wanted.items():
            if key not in self.tasks:
                context = client_context(tls) if tls is not None and spec.type == "http" else None
                task = asyncio.get_running_loop().create_task(
                    self._run(key[0], key[1], spec, slot, context, server_name))
                self.tasks[key] = (spec, slot, tls, server_name, task)

    def close(self) -> None:
        for *_, task in self.tasks.values():
            task.cancel()
        self.tasks.clear()

    async def _run(self, service: str, address: str, spec, slot: int, context, server_name) -> None:
        healthy = self.segment.target_stats(slot)["healthy"]
        streak = 0                        # successes (> 0) or failures (< 0) in a row
        while True:
            ok, why = await probe(address, spec, context, server_name)
            streak = (max(streak, 0) + 1) if ok else (min(streak, 0) - 1)
            if healthy and streak <= -spec.unhealthy_threshold:
                healthy = False
                self.segment.target_set_healthy(slot, False)
                log(f"service {service} target {address} is down ({why}, {-streak} checks in a row)",
                    "warning")
            elif not healthy and streak >= spec.healthy_threshold:
                healthy = True
                self.segment.target_set_healthy(slot, True)
                log(f"service {service} target {address} is up again")
            await asyncio.sleep(spec.interval)


async def probe(address: str, spec, context=None, server_name: str | None = None) -> tuple[bool, str]:
    """(passed, what failed). `context`: TLS for an https service's HTTP check, verified under
    `server_name` (default: the address's host)."""
    if spec.type == "grpc":
        return await asyncio.get_running_loop().run_in_executor(None, _grpc_check, address, spec)
    try:
        line = await asyncio.wait_for(_exchange(address, spec, context, server_name), spec.timeout)
    except asyncio.TimeoutError:
        return False, f"no answer within {spec.timeout:g}s"
    except OSError as exc:
        return False, exc.strerror or type(exc).__name__
    if spec.type == "tcp":
        return True, ""
    parts = line.split()
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return False, "not an HTTP response"
    status = int(parts[1])
    return status in spec.expect_status, f"status {status}"


async def _exchange(address: str, spec, context, server_name: str | None) -> bytes:
    """Connect; for an HTTP check send the request and return the status line."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(
        host.strip("[]"), int(port), ssl=context,
        server_hostname=(server_name or host.strip("[]")) if context is not None else None)
    try:
        if spec.type == "tcp":
            return b""
        authority = f"{server_name}:{port}" if server_name else address
        writer.write(f"GET {spec.path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: fastgw-health\r\n"
                     f"Connection: close\r\n\r\n".encode("latin-1"))
        return await reader.readline()
    finally:
        writer.close()


_grpc_channels: dict = {}


def _grpc_check(address: str, spec) -> tuple[bool, str]:
    """grpc.health.v1.Health/Check, in a thread with a blocking grpcio channel (kept per target).
    The messages are tiny, so they are written and read by hand rather than with generated stubs:
    HealthCheckRequest {string service = 1}, HealthCheckResponse {ServingStatus status = 1},
    SERVING = 1."""
    # grpcio is the grpc extra's: needed only by services with gRPC health checks.
    import grpc

    channel = _grpc_channels.get(address)
    if channel is None:
        channel = _grpc_channels[address] = grpc.insecure_channel(address)
    name = spec.grpc_service.encode()
    request = b"\x0a" + bytes([len(name)]) + name if name else b""
    check = channel.unary_unary("/grpc.health.v1.Health/Check")
    try:
        reply = check(request, timeout=spec.timeout)
    except grpc.RpcError as exc:
        return False, f"gRPC {exc.code().name}"
    status = reply[1] if len(reply) >= 2 and reply[0] == 0x08 else 0
    return status == 1, f"gRPC health status {status} (1 = SERVING)"
