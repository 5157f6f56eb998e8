# cython: language_level=3
"""The response cache of the `cache` plugin (an RFC 9111 subset), consulted by the data plane.

Per worker and in memory: a dict in least-recently-used order, bounded by `max_bytes` (the oldest
entries go first). A hit is written by the protocol from the stored status, headers and body with
no Python code of ours in between. While one request fills a key, others asking for it wait for
that fill (`filling`) instead of going upstream too.

Stored: answers to GET with a status in `statuses` whose Cache-Control does not say no-store,
no-cache or private, that set no cookie and do not `Vary: *`. Freshness: `s-maxage`, else
`max-age`, else the plugin's `ttl`. `stale_if_error`: an expired entry is kept that much longer
and served (X-Cache: STALE) when the upstream fails or answers 5xx.
"""
cimport cython
from cpython.bytes cimport PyBytes_GET_SIZE

from fastgw._core.buffer cimport ascii_lower


@cython.final
cdef class CachedResponse:
    pass


cdef bytes _header(list headers, bytes lower_name):
    cdef Py_ssize_t i
    for i in range(0, len(headers), 2):
        if ascii_lower(<bytes>headers[i]) == lower_name:
            return headers[i + 1]
    return None


cdef double _seconds(bytes directive, bytes name):
    """max-age=N / s-maxage=N -> N, else -1."""
    cdef bytes value
    if not directive.startswith(name + b"="):
        return -1
    value = directive[PyBytes_GET_SIZE(name) + 1:].strip(b'"')
    return <double>int(value) if value.isdigit() else -1


@cython.final
cdef class ResponseCache:
    def __init__(self, *, double ttl, double stale_if_error=0.0, vary=(), long long max_bytes,
                 long long max_entry_bytes, statuses=(200, 203, 204, 300, 301, 404, 410)):
        self.entries = {}
        self.filling = {}
        self.ttl = ttl
        self.stale_if_error = stale_if_error
        self.vary = tuple(name.lower().encode() for name in vary)
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.statuses = frozenset(statuses)
        self.used = 0

    cdef bytes key_for(self, bytes method, bytes host, bytes path, bytes query, list headers,
                       bytes consumer):
        """GET and HEAD share entries; the vary headers' values and the consumer (once
        authenticated) are part of the key."""
        cdef list parts = [b"GET ", ascii_lower(host), b" ", path, query]
        for name in self.vary:
            parts.append(b"\x00")
            value = _header(headers, name)
            if value is not None:
                parts.append(value)
        if consumer is not None:
            parts.append(b"\x00@")
            parts.append(consumer)
        return b"".join(parts)

    cdef CachedResponse lookup(self, bytes key, double now):
        """The entry for `key` while it is fresh or may still be served stale, else None. A hit
        becomes the most recently used."""
        cdef CachedResponse entry = self.entries.get(key)
        if entry is None:
            return None
        if now >= entry.stale_until and now >= entry.fresh_until:
            self._remove(key)
            return None
        del self.entries[key]
        self.entries[key] = entry
        return entry

    cdef double storable_ttl(self, int status, list headers):
        """How long an answer may be served from the cache; 0: not stored."""
        cdef double ttl = self.ttl, max_age = -1, s_maxage = -1, seconds
        cdef Py_ssize_t i
        cdef bytes name
        if status not in self.statuses:
            return 0
        for i in range(0, len(headers), 2):
            name = ascii_lower(<bytes>headers[i])
            if name == b"set-cookie":
                return 0                  # a shared cache never hands one client's cookie to another
            if name == b"vary" and b"*" in <bytes>headers[i + 1]:
                return 0
            if name == b"cache-control":
                for directive in ascii_lower(<bytes>headers[i + 1]).split(b","):
                    directive = directive.strip()
                    if directive in (b"no-store", b"no-cache", b"private"):
                        return 0
                    seconds = _seconds(directive, b"s-maxage")
                    if seconds >= 0:
                        s_maxage = seconds
                    seconds = _seconds(directive, b"max-age")
                    if seconds >= 0:
                        max_age = seconds
        if s_maxage >= 0:
            return s_maxage
        if max_age >= 0:
            return max_age
        return ttl

    cdef void store(self, bytes key, bytes host, bytes path, bytes query, int status, list headers,
                    bytes body, double ttl, double now):
        cdef CachedResponse entry = CachedResponse.__new__(CachedResponse)
        cdef list kept = []
        cdef Py_ssize_t i, size = PyBytes_GET_SIZE(body) + PyBytes_GET_SIZE(key)
        for i in range(0, len(headers), 2):
            name = ascii_lower(<bytes>headers[i])
            if name != b"date" and name != b"age":
                kept.append(headers[i])
                kept.append(headers[i + 1])
                size += PyBytes_GET_SIZE(<bytes>headers[i]) + PyBytes_GET_SIZE(<bytes>headers[i + 1])
        if size > self.max_entry_bytes or size > self.max_bytes:
            return
        entry.key = key
        entry.base = "GET " + ascii_lower(host).decode("latin-1") + " " + (path + query).decode("latin-1")
        entry.host = ascii_lower(host)
        entry.path = path
        entry.status = status
        entry.headers = kept
        entry.body = body
        entry.stored = now
        entry.fresh_until = now + ttl
        entry.stale_until = now + ttl + self.stale_if_error
        entry.size = size
        if key in self.entries:
            self._remove(key)
        while self.used + size > self.max_bytes and self.entries:
            self._remove(next(iter(self.entries)))
            self.evictions += 1
        self.entries[key] = entry
        self.used += size
        self.stores += 1

    cdef void _remove(self, bytes key):
        cdef CachedResponse entry = self.entries.pop(key)
        self.used -= entry.size

    def purge(self, key=None, host=None, path_prefix=None):
        """Remove the entries of one key ("GET host /path?query", every vary variant), or of a
        host (and path prefix); -> how many."""
        if key is not None:
            method, _, rest = key.partition(" ")
            host_part, _, target = rest.partition(" ")
            key = f"GET {host_part.lower()} {target}"
            doomed = [k for k, e in self.entries.items() if (<CachedResponse>e).base == key]
        else:
            bhost = host.lower().encode() if host else None
            bprefix = (path_prefix or "/").encode()
            doomed = [k for k, e in self.entries.items()
                      if (bhost is None or (<CachedResponse>e).host == bhost) and
                      (<CachedResponse>e).path.startswith(bprefix)]
        for k in doomed:
            self._remove(k)
        return len(doomed)

    def stats(self):
        return {"entries": len(self.entries), "bytes": self.used, "hits": self.hits,
                "misses": self.misses, "stale": self.stale_hits, "stores": self.stores,
                "evictions": self.evictions}
