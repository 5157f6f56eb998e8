"""rate_limit: limits decided in the data plane (fastgw/_core/ratelimit.pyx) over the shared-memory
table, so a limit holds for the host as a whole, whatever the number of workers.

A limit whose key needs no identity (`ip`, `header:`, `query:`, `route`, `service`, `profile`) is
decided before the access plugins, so failed authentication attempts count. One keyed on
`consumer` or `claim:` is decided after them (priority 910), so it and per-consumer plans
(`consumers[].rate_limit`) see the identified consumer; a request the access plugins refuse (401 or
403) is charged to its client address instead, and an address whose allowance is used up is
refused before authentication runs. The client address follows fastgw/plugins/client_address.py
with this limit's `trusted_proxies`. Every answer of a limited route carries `RateLimit-Policy` and
`RateLimit` (IETF httpapi draft), or `X-RateLimit-*` with `headers: legacy`; a refused request gets
429 `rate_limited` with `Retry-After`.
"""
from __future__ import annotations

import re
import time
from typing import Literal, Union

import msgspec

from fastgw._core.ratelimit import HEADERS_DRAFT, HEADERS_LEGACY, HEADERS_NONE, Policy
from fastgw.config.model import Duration
from fastgw.api import Plugin
from fastgw.plugins.client_address import TrustedProxies, check_cidrs
from fastgw.plugins.redis_store import RequestStore

_KEY = re.compile(r"^(consumer|ip|route|service|profile|(header|query|claim):[!#$%&'*+\-.^_`|~0-9A-Za-z]+)$")


class RateLimit(Plugin):
    name = "rate_limit"
    phase = "access"
    priority = 910
    data_plane = True                              # decided by the protocol, not in the Python chain

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        limit: int
        window: Duration = 1.0
        burst: int = 0                             # gcra: at most this many at once (default: limit)
        algorithm: Literal["gcra", "sliding_window", "fixed_window", "concurrency"] = "gcra"
        key: list[str] = msgspec.field(default_factory=lambda: ["consumer"])
        headers: Union[bool, Literal["legacy"]] = True
        name: Union[str, None] = None              # in the RateLimit headers (default: the route's name)
        scope: Literal["local", "cluster"] = "local"
        sync_interval: Duration = 0.1              # cluster: how often hosts settle their counts in Redis
        on_store_error: Literal["local", "allow", "deny"] = "local"
        trusted_proxies: list[str] = []            # whose X-Forwarded-For / PROXY address is believed

        def __post_init__(self):
            check_cidrs(self.trusted_proxies)
            if self.limit < 1:
                raise ValueError("limit must be at least 1")
            if self.window <= 0:
                raise ValueError("window must be greater than 0")
            if self.burst < 0:
                raise ValueError("burst must not be negative")
            if self.algorithm == "sliding_window" and self.limit > (1 << 24) - 1:
                raise ValueError("sliding_window counts up to 16777215 per window")
            if not self.key:
                raise ValueError("key needs at least one part")
            if self.scope == "cluster":
                if self.algorithm != "fixed_window":
                    raise ValueError("scope: cluster counts fixed windows on the wall clock: "
                                     "algorithm must be fixed_window")
                if 0 < self.sync_interval < 0.01:
                    raise ValueError("sync_interval must be 0 (a Redis call per request) or at least 10ms")
                if self.limit > (1 << 24) - 1 or self.window < 0.001:
                    raise ValueError("a cluster limit is at most 16777215 per window of at least 1ms")
            for part in self.key:
                if not _KEY.match(part):
                    raise ValueError(f"key part {part!r} is not consumer, ip, route, service, profile, "
                                     "header:NAME, query:NAME or claim:NAME")

    def __init__(self, config):
        super().__init__(config)
        parts = []
        for part in config.key:
            kind, _, name = part.partition(":")
            parts.append((kind, name.lower().encode() if kind == "header" else name.encode() or None))
        headers = HEADERS_LEGACY if config.headers == "legacy" else HEADERS_DRAFT if config.headers else HEADERS_NONE
        self.policy = Policy(config.algorithm, config.limit, config.window, config.burst, key_parts=tuple(parts),
                             headers=headers, name=config.name, cluster=config.scope == "cluster",
                             on_store_error=config.on_store_error)
        self.trusted = TrustedProxies(config.trusted_proxies) if config.trusted_proxies else None
        self.policy.client_key = self.trusted.client_key if self.trusted is not None else None
        self.scope_to("")

    def scope_to(self, route: str) -> None:
        """Keys of this limit are its own: a route's rate_limit counts for that route alone (a
        global one, scope "", for all routes together unless its key has `route`)."""
        config = self.config
        self.policy.prefix = msgspec.json.encode(
            [route, config.limit, float(config.window), config.burst, config.algorithm, config.key]) + b"\0"

    @classmethod
    def check(cls, config, full_config):
        if config.scope == "cluster" and full_config.cluster is None:
            yield "scope", "scope: cluster needs cluster.redis (the store the hosts share)"

    def setup(self, context):
        if self.config.scope == "cluster" and self.config.sync_interval == 0 and context.cluster is not None:
            if getattr(self, "store", None) is None or self.store.spec != context.cluster:
                self.store = RequestStore(context.cluster)
            self.policy.remote = self.decide_in_redis
        self.policy.plans = {c.name.encode(): (c.rate_limit.limit, int(c.rate_limit.window * 1e9))
                             for c in context.consumers if c.rate_limit is not None}

    async def decide_in_redis(self, key: bytes, limit: int, window_ns: int):
        """sync_interval 0: one atomic count in Redis per request (exact across hosts)."""
        count, number = await self.store.count(self.policy.key_hash(key), window_ns)
        reset = ((number + 1) * window_ns - time.time_ns()) / 1e9
        admitted = count <= limit
        return admitted, max(0, limit - count), reset, 0 if admitted else reset
