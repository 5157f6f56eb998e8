cdef class CachedResponse:
    cdef readonly bytes key               # full key (with the vary values and identity)
    cdef readonly str base                # "GET host /path?query": what purges name
    cdef readonly bytes host
    cdef readonly bytes path
    cdef readonly int status
    cdef readonly list headers            # [name, value, ...] as the upstream sent them, minus Date/Age
    cdef readonly bytes body
    cdef readonly tuple vary_names        # the request fields its Vary names (lower-case bytes)
    cdef readonly tuple vary_values       # their values in the request that fetched it (None: absent)
    cdef readonly double stored           # monotonic seconds
    cdef readonly double fresh_until
    cdef readonly double stale_until      # stale_if_error: served instead of an error until then
    cdef readonly Py_ssize_t size


cdef bytes credential_digest(list headers, tuple fields, bytes peer_certificate)


cdef class ResponseCache:
    cdef dict entries                     # key -> [CachedResponse] (variants, most recently used
                                          # first); keys least recently used first
    cdef dict filling                     # key -> [(connection, request)] waiting for the fill
    cdef readonly long long max_bytes
    cdef readonly long long max_entry_bytes
    cdef readonly long long used
    cdef readonly long long count         # variants stored
    cdef readonly double ttl
    cdef readonly double stale_if_error
    cdef readonly tuple vary              # lower-case header names (bytes)
    cdef readonly frozenset statuses
    cdef readonly long long hits, misses, stale_hits, stores, evictions

    cdef bytes key_for(self, bytes host, bytes path, bytes query, list headers, bytes consumer,
                       bytes credential)
    cdef CachedResponse lookup(self, bytes key, list headers, double now)
    cdef double storable_ttl(self, int status, list headers)
    cdef void store(self, bytes key, bytes host, bytes path, bytes query, list request_headers,
                    int status, list headers, bytes body, double ttl, double now)
    cdef void _remove(self, bytes key, Py_ssize_t i)
