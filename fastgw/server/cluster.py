"""Cluster scope: the supervisor of each host settles its `scope: cluster` rate-limit reserves with
Redis every `sync_interval` (the smallest one configured), in one pipelined round trip:

- ZADD/ZREMRANGEBYSCORE/ZCARD on `<prefix>nodes`: this host is alive, and how many are;
- per key of the current window: INCRBY `<prefix>rl:<key hash>:<window ms>:<window number>` by
  the host's implicit share (the first time in a window) or by a new share of what is left (when
  its reserve runs low), and PEXPIRE it; the answer is what all hosts have reserved so far.

What the window no longer had is taken back from (or not added to) the host's reserve in the
shared-memory table the workers decide against (fastgw/_core/ratelimit.pyx), so the hosts together
never admit more than the limit. A round trip that
fails or takes longer than `cluster.timeout` marks the store down in shared memory, so the workers
apply `on_store_error`; the next one that succeeds brings every node back in step, without a restart.
The data plane never waits for Redis.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import time

from fastgw._core.ratelimit import cluster_grant, cluster_take
from fastgw.config.errors import ConfigError
from fastgw.config.model import parse_duration
from fastgw.log import log
from fastgw.plugins.redis_store import redis_client

NODE_TTL = 5.0            # a node that has not synced for this long no longer counts


def cluster_interval(config) -> float | None:
    """The sync interval the config asks for, or None when nothing has cluster scope. Limits
    decided per request (sync_interval 0) still need the node count: a sync every second."""
    intervals = [float(parse_duration(settings.get("sync_interval", 0.1)))
                 for entries in [config.plugins, *(r.plugins for r in config.routes)]
                 for entry in entries if isinstance(entry, dict) and "rate_limit" in entry
                 for settings in [entry["rate_limit"] or {}] if settings.get("scope") == "cluster"]
    if config.cluster is None or not intervals:
        return None
    return min([i for i in intervals if i > 0] or [1.0])


class _RedisLoop:
    """A supervisor task that talks to the cluster's Redis until closed."""

    def __init__(self, cluster):
        self.redis = redis_client(cluster)
        self.down = False
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.redis.aclose()

    async def _run(self) -> None:
        raise NotImplementedError


class ClusterSync(_RedisLoop):
    def __init__(self, segment, cluster, interval: float):
        super().__init__(cluster)
        self.segment = segment
        segment.activate()                        # cluster_take/grant work on the active segment's table
        self.spec = cluster
        self.prefix = cluster.key_prefix
        self.timeout = cluster.timeout
        self.interval = interval
        self.node = f"{socket.gethostname()}:{os.getpid()}"
        self.reserved: set[tuple[int, int]] = set()    # (key hash, window) whose share is in Redis
        self.totals: dict[tuple[int, int], int] = {}   # the window's reserved total, last seen

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await asyncio.wait_for(self.sync_once(), self.timeout)
            except Exception as exc:                   # noqa: BLE001 - Redis errors, timeouts, refusals
                self._mark_down(exc)
            else:
                self._mark_up()
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    async def sync_once(self) -> None:
        taken = cluster_take()
        now = time.time()
        nodes = max(self.segment.cluster_nodes, 1)
        nodes_key = self.prefix + "nodes"
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(nodes_key, {self.node: now})
        pipe.zremrangebyscore(nodes_key, 0, now - NODE_TTL)
        pipe.zcard(nodes_key)
        asked = []                                 # (entry, amount reserved now)
        for entry in taken:
            _, key_hash, window_ms, limit, number, admitted, reserve = entry
            first = (key_hash, number) not in self.reserved
            if first:
                amount = limit // nodes            # the implicit share this host started with
            elif reserve * 4 < max(limit // nodes, 1) and admitted:
                amount = max(1, (limit - self.totals.get((key_hash, number), 0)) // nodes)
            else:
                continue                           # enough left: nothing to ask
            key = f"{self.prefix}rl:{key_hash:016x}:{window_ms}:{number}"
            pipe.incrby(key, amount)
            pipe.pexpire(key, 2 * window_ms)
            asked.append((entry, amount, first))
        results = await pipe.execute()
        self.segment.cluster_nodes = max(int(results[2]), 1)
        for k, ((index, key_hash, _, limit, number, _, _), amount, first) in enumerate(asked):
            total = int(results[3 + 2 * k])
            self.reserved.add((key_hash, number))
            self.totals[(key_hash, number)] = total
            over = max(0, total - limit)           # what the window no longer has of this amount
            # The implicit share was spent already (or is being spent): take back what is over;
            # a new amount is granted minus what is over.
            cluster_grant(index, key_hash, number, -min(over, amount) if first else amount - min(over, amount))
        current = {(e[1], e[4]) for e in taken}
        self.reserved &= current                   # forget windows that are over
        self.totals = {k: v for k, v in self.totals.items() if k in current}

    def _mark_down(self, exc: BaseException) -> None:
        self.segment.cluster_down = True
        if not self.down:
            self.down = True
            log(f"cluster store unreachable ({type(exc).__name__}: {exc}); cluster rate limits "
                f"follow on_store_error until it is back", "warning")

    def _mark_up(self) -> None:
        self.segment.cluster_down = False
        if self.down:
            self.down = False
            log("cluster store reachable again: cluster rate limits are shared again")


# --- config distribution (cluster.config_sync) -------------------------------------------------

SHARED_SECTIONS = ("services", "routes", "consumers", "plugins", "clients")   # not listeners, admin, workers
CONFIG_POLL = 0.25


class ConfigSync(_RedisLoop):
    """cluster.config_sync: an admin change on any node is stored in Redis under a cluster-wide
    version (`<prefix>config:version`, `<prefix>config:document`, written together in one MULTI)
    and every node, polling every 250 ms, applies a newer version through its own two-phase apply
    and writes it to its config file. Only the API sections are shared (services, routes,
    consumers, plugins, clients): listeners, admin, workers and cluster stay each node's own. A node
    that starts later applies the current version at once; a node that loses Redis keeps serving
    its last config and catches up when Redis is back."""

    def __init__(self, supervisor, cluster):
        super().__init__(cluster)
        self.supervisor = supervisor
        self.version_key = cluster.key_prefix + "config:version"
        self.document_key = cluster.key_prefix + "config:document"
        self.applied = 0                           # the cluster version this node runs

    async def publish(self, document: dict) -> None:
        """After a local admin change: make it the cluster's current version."""
        shared = json.dumps({k: document[k] for k in SHARED_SECTIONS if k in document})
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                version, _ = await pipe.incr(self.version_key).set(self.document_key, shared).execute()
        except Exception as exc:                   # noqa: BLE001 - the change stays applied here
            log(f"config change not shared with the cluster ({type(exc).__name__}: {exc})", "warning")
            return
        self.applied = int(version)

    async def _run(self) -> None:
        while True:
            try:
                await self._catch_up()
                if self.down:
                    self.down = False
                    log("cluster config store reachable again")
            except Exception as exc:               # noqa: BLE001 - Redis away: keep serving
                if not self.down:
                    self.down = True
                    log(f"cluster config store unreachable ({type(exc).__name__}: {exc}); "
                        f"serving config version {self.supervisor.store.version}", "warning")
            await asyncio.sleep(CONFIG_POLL)

    async def _catch_up(self) -> None:
        version = await self.redis.get(self.version_key)
        if version is None or int(version) <= self.applied:
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            version, shared = await pipe.get(self.version_key).get(self.document_key).execute()
        version = int(version)
        document = self.supervisor.store.document
        document.update(json.loads(shared))
        try:
            async with self.supervisor.change_lock:
                loaded = self.supervisor.store.validate(document)
                await self.supervisor.apply(loaded)
        except ConfigError as exc:
            log(f"cluster config version {version} refused here:\n{exc}", "error")
        else:
            log(f"applied cluster config version {version}")
        self.applied = version                     # refused or not: do not try it again
