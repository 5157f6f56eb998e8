"""cache: answers stored in memory and served by the data plane (fastgw/_core/cache.pyx).

Runs after authentication and rate limiting (priority 100): a cached answer is only ever given
to a request that was allowed through. Key: method (HEAD is served from GET entries) + host + path
+ query + the `vary` headers' values + the identity on routes with an authentication plugin (the
consumer, else a keyed digest of the credential: fastgw/plugins/chain.py says where it is read).
A request that carries Authorization on a route without an authentication plugin is neither
served from nor stored in the cache. Answers whose `Vary` names request fields are stored per
variant (RFC 9111 §4.1). The request's own Cache-Control is not honoured (as Kong's proxy-cache
by default): clients cannot make the gateway skip its cache.
Answers carry `X-Cache: HIT | MISS | STALE` and, from the cache, `Age`.

Per worker: `max_bytes` bounds each worker's memory, and concurrent misses for one key are
coalesced within a worker (with N workers, at most N upstream fetches per key). Purge through
the admin API (`POST /cache/purge`) reaches every worker.
"""
from __future__ import annotations

import msgspec

from fastgw._core.cache import ResponseCache
from fastgw.config.model import Duration, Size
from fastgw.api import Plugin


class Cache(Plugin):
    name = "cache"
    phase = "access"
    priority = 100
    data_plane = True                              # looked up and filled by the protocol

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        ttl: Duration = 60.0                       # freshness when the answer gives no max-age/s-maxage
        vary: list[str] = []                       # request headers whose values are part of the key
        stale_if_error: Duration = 0.0             # serve an expired answer this long when the upstream fails
        max_bytes: Size = 64 * 1024 * 1024         # per worker; least recently used entries go first
        max_entry_bytes: Size = 1024 * 1024        # larger answers are passed through, not stored
        statuses: list[int] = msgspec.field(default_factory=lambda: [200, 203, 204, 300, 301, 404, 410])

        def __post_init__(self):
            if self.ttl <= 0:
                raise ValueError("ttl must be greater than 0")
            if self.max_entry_bytes > self.max_bytes:
                raise ValueError("max_entry_bytes must not exceed max_bytes")
            if any(not 200 <= s <= 599 for s in self.statuses):
                raise ValueError("statuses must be final statuses (200-599)")

    def __init__(self, config):
        super().__init__(config)
        self.response_cache = ResponseCache(
            ttl=config.ttl, stale_if_error=config.stale_if_error, vary=config.vary,
            max_bytes=config.max_bytes, max_entry_bytes=config.max_entry_bytes, statuses=config.statuses)
