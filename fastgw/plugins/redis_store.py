"""The Redis side of `scope: cluster` rate limits decided per request (`sync_interval: 0`), used by
the rate_limit plugin in each worker; the supervisor's sync loops (fastgw/server/cluster.py) make
their clients with `redis_client` too."""
from __future__ import annotations

import asyncio
import time


def redis_client(cluster):
    """A redis.asyncio client whose every call gives up after `cluster.timeout`."""
    # redis is the cluster extra's (pip install 'fastgw[cluster]'): needed only with cluster.redis.
    import redis.asyncio as aioredis

    return aioredis.from_url(cluster.redis, socket_timeout=cluster.timeout,
                             socket_connect_timeout=cluster.timeout)


# Per-request decisions (sync_interval: 0): one atomic script per request, in the worker.
_COUNT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""
MAX_IN_FLIGHT = 256       # Redis calls one worker has waiting; beyond that, on_store_error at once


class StoreBusy(Exception):
    pass


class RequestStore:
    """A worker's Redis client for per-request rate-limit decisions, made at first use (in the
    worker's loop). Each call is bounded by `cluster.timeout` and by MAX_IN_FLIGHT calls waiting,
    so a slow Redis costs a request at most the timeout and never piles up."""

    def __init__(self, cluster):
        self.spec = cluster
        self.prefix = cluster.key_prefix
        self.redis = None
        self.script = None
        self.in_flight = 0

    async def count(self, key_hash: int, window_ns: int) -> tuple[int, int]:
        """(the window's count after this request, the window number)."""
        if self.in_flight >= MAX_IN_FLIGHT:
            raise StoreBusy(f"{MAX_IN_FLIGHT} Redis calls already waiting")
        if self.redis is None:
            self.redis = redis_client(self.spec)
            self.script = self.redis.register_script(_COUNT)
        window_ms = window_ns // 1_000_000
        number = time.time_ns() // window_ns
        self.in_flight += 1
        try:
            count = await asyncio.wait_for(
                self.script(keys=[f"{self.prefix}rl:{key_hash:016x}:{window_ms}:{number}"],
                            args=[2 * window_ms]), self.spec.timeout)
        finally:
            self.in_flight -= 1
        return int(count), number
