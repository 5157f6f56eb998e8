# cython: language_level=3
"""The response cache of the `cache` plugin (an RFC 9111 subset), consulted by the data plane.

Per worker and in memory: a dict from key to that key's variants, keys in least-recently-used
order, bounded by `max_bytes` (the oldest key's least recently used variant goes first). A hit is
written by the protocol from the stored status, headers and body with no Python code of ours in
between. While one request fills a key, others asking for it wait for that fill (`filling`)
instead of going upstream too.

Key: host, path, query, the plugin's `vary` headers' values, and the identity: the consumer once
identified, else (on a route with an authentication plugin) a keyed digest of the credential the
request presented, never the credential itself.

Variants (RFC 9111 §4.1): an answer whose `Vary` names request fields is stored with the values
those fields had in the request that fetched it, and only given to a request whose values are the
same (repeated fields combined with ", ", each value trimmed; no other normalisation). At most
MAX_VARIANTS per key, the least recently used going first.

Stored: answers to GET with a status in `statuses` whose Cache-Control does not say no-store,
no-cache or private, that set no cookie and do not `Vary: *` (nor on a field the gateway writes). Freshness: `s-maxage`, else
`max-age`, else the plugin's `ttl`. `stale_if_error`: an expired entry is kept that much longer
and served (X-Cache: STALE) when the upstream fails or answers 5xx.
"""
import hashlib
import os

cimport cython
from cpython.bytes cimport PyBytes_GET_SIZE

from fastgw._core.buffer cimport ascii_lower

cdef Py_ssize_t MAX_VARIANTS = 16         # per key: one per language, encoding, session ... seen lately

# Request fields the gateway writes upstream itself, so the request's own values say nothing of
# what the upstream saw: an answer that varies on one is not stored. (Host and the consumer are in
# the key already.)
cdef frozenset _WRITTEN_UPSTREAM = frozenset((b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                                              b"x-request-id", b"traceparent"))

# Credentials are keyed by a BLAKE2b digest under this process's secret: the cache's memory holds
# nothing that is, or leads to, a usable credential.
cdef bytes _IDENTITY_SECRET = os.urandom(32)


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


cdef tuple _vary_names(list headers):
    """The request fields the answer's Vary fields name, lower-case, in order, once each
    (b"*" among them when it varies on anything)."""
    cdef list names = []
    cdef Py_ssize_t i
    for i in range(0, len(headers), 2):
        if ascii_lower(<bytes>headers[i]) == b"vary":
            for name in ascii_lower(<bytes>headers[i + 1]).split(b","):
                name = name.strip(b" \t")
                if name and name not in names:
                    names.append(name)
    return tuple(names)


cdef tuple _vary_values(list headers, tuple names):
    """Each named field's value in the request: its fields combined with ", " (RFC 9110 §5.3),
    each trimmed; None when absent."""
    cdef list values = []
    cdef Py_ssize_t i
    for name in names:
        found = None
        for i in range(0, len(headers), 2):
            if ascii_lower(<bytes>headers[i]) == name:
                value = (<bytes>headers[i + 1]).strip(b" \t")
                found = value if found is None else found + b", " + value
        values.append(found)
    return tuple(values)


cdef bytes credential_digest(list headers, tuple fields, bytes peer_certificate):
    """A keyed digest of what a request presented to the route's authentication plugins: the
    values of `fields` (lower-case header names) and the TLS client certificate (DER)."""
    hasher = hashlib.blake2b(key=_IDENTITY_SECRET, digest_size=16)
    cdef Py_ssize_t i
    for i in range(0, len(headers), 2):
        name = ascii_lower(<bytes>headers[i])
        if name in fields:
            hasher.update(name + b":" + <bytes>headers[i + 1] + b"\n")   # no field holds a line break
    if peer_certificate:
        hasher.update(b"\ncertificate:" + peer_certificate)
    return hasher.digest()


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
        self.count = 0

    cdef bytes key_for(self, bytes host, bytes path, bytes query, list headers, bytes consumer,
                       bytes credential):
        """GET and HEAD share entries; the vary headers' values and the identity (the consumer,
        else the credential's digest) are part of the key."""
        cdef list parts = [b"GET ", ascii_lower(host), b" ", path, query]
        for name in self.vary:
            parts.append(b"\x00")
            value = _header(headers, name)
            if value is not None:
                parts.append(value)
        if consumer is not None:
            parts.append(b"\x00@")
            parts.append(consumer)
        elif credential is not None:
            parts.append(b"\x00#")
            parts.append(credential)
        return b"".join(parts)

    cdef CachedResponse lookup(self, bytes key, list headers, double now):
        """The variant of `key` whose Vary fields match `headers`, while it is fresh or may still
        be served stale, else None. A hit becomes the most recently used."""
        cdef list variants = self.entries.get(key)
        cdef CachedResponse entry
        cdef Py_ssize_t i = 0
        if variants is None:
            return None
        while i < len(variants):
            entry = <CachedResponse>variants[i]
            if now >= entry.stale_until and now >= entry.fresh_until:
                self._remove(key, i)
                continue
            if _vary_values(headers, entry.vary_names) == entry.vary_values:
                del variants[i]
                variants.insert(0, entry)
                del self.entries[key]
                self.entries[key] = variants
                return entry
            i += 1
        return None

    cdef double storable_ttl(self, int status, list headers):
        """How long an answer may be served from the cache; 0: not stored."""
        cdef double ttl = self.ttl, max_age = -1, s_maxage = -1, seconds
        cdef Py_ssize_t i
        cdef bytes name
        if status not in self.statuses:
            return 0
        vary = _vary_names(headers)
        if b"*" in vary:
            return 0                      # RFC 9111 §4.1: "*" never matches a later request
        if not _WRITTEN_UPSTREAM.isdisjoint(vary):
            return 0
        for i in range(0, len(headers), 2):
            name = ascii_lower(<bytes>headers[i])
            if name == b"set-cookie":
                return 0                  # a shared cache never hands one client's cookie to another
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

    cdef void store(self, bytes key, bytes host, bytes path, bytes query, list request_headers,
                    int status, list headers, bytes body, double ttl, double now):
        """Keep the answer to a request (whose fields `request_headers` were) under `key`: the
        variant of its Vary values, replacing the one that request would have been given."""
        cdef CachedResponse entry = CachedResponse.__new__(CachedResponse)
        cdef list kept = [], variants
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
        entry.vary_names = _vary_names(headers)
        entry.vary_values = _vary_values(request_headers, entry.vary_names)
        entry.stored = now
        entry.fresh_until = now + ttl
        entry.stale_until = now + ttl + self.stale_if_error
        entry.size = size
        variants = self.entries.get(key)
        if variants is not None:
            i = 0
            while i < len(variants):      # superseded: what this request would have been given
                if _vary_values(request_headers, (<CachedResponse>variants[i]).vary_names) == \
                        (<CachedResponse>variants[i]).vary_values:
                    self._remove(key, i)
                else:
                    i += 1
            if len(variants) >= MAX_VARIANTS:
                self._remove(key, len(variants) - 1)
                self.evictions += 1
        while self.used + size > self.max_bytes and self.entries:
            oldest = next(iter(self.entries))
            self._remove(oldest, len(self.entries[oldest]) - 1)
            self.evictions += 1
        variants = self.entries.pop(key, None)
        if variants is None:
            variants = []
        variants.insert(0, entry)
        self.entries[key] = variants      # the most recently used key
        self.used += size
        self.count += 1
        self.stores += 1

    cdef void _remove(self, bytes key, Py_ssize_t i):
        """Drop variant `i` of `key` (and the key with its last variant)."""
        cdef list variants = self.entries[key]
        cdef CachedResponse entry = variants.pop(i)
        self.used -= entry.size
        self.count -= 1
        if not variants:
            del self.entries[key]

    def purge(self, key=None, host=None, path_prefix=None):
        """Remove the entries of one key ("GET host /path?query": every identity and vary
        variant), or of a host (and path prefix); -> how many."""
        cdef CachedResponse first
        if key is not None:
            method, _, rest = key.partition(" ")
            host_part, _, target = rest.partition(" ")
            key = f"GET {host_part.lower()} {target}"
        bhost = host.lower().encode() if host else None
        bprefix = (path_prefix or "/").encode()
        doomed = []
        for k, variants in self.entries.items():
            first = <CachedResponse>variants[0]   # every variant of a key has its base, host, path
            if key is not None:
                if first.base == key:
                    doomed.append(k)
            elif (bhost is None or first.host == bhost) and first.path.startswith(bprefix):
                doomed.append(k)
        purged = 0
        for k in doomed:
            for entry in self.entries.pop(k):
                self.used -= (<CachedResponse>entry).size
                purged += 1
        self.count -= purged
        return purged

    def stats(self):
        return {"entries": self.count, "bytes": self.used, "hits": self.hits,
                "misses": self.misses, "stale": self.stale_hits, "stores": self.stores,
                "evictions": self.evictions}
