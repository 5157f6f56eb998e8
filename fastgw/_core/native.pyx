# cython: language_level=3
"""Built-in plugins' request checks, done in the data plane without building the Python request.

A route whose plugins all offer one (`Plugin.native()`; today key_auth from a header, ip_filter and
acl) runs these instead of the Python chain: no per-request Python objects beyond what the check
itself needs. Each check keeps a reference to its plugin and reads the plugin's current tables, so
a reload that gives the plugin new consumers reaches the check too. `run` returns None (go on), the
identified consumer's name (bytes), or the plugin's answer (a fastgw.Response).
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

from fastgw._core.buffer cimport ascii_ieq

import hashlib
from hmac import compare_digest

cdef object _sha256 = hashlib.sha256
cdef Py_ssize_t VERIFIED_MAX = 65536      # key_auth: verified keys remembered per worker


cdef class NativeCheck:
    cdef object run(self, list headers, bytes peer_ip, bytes client_ip, bytes forwarded_for,
                    bytes consumer):
        raise NotImplementedError


cdef inline bytes _header(list headers, bytes lower_name):
    cdef Py_ssize_t i, n = PyBytes_GET_SIZE(lower_name)
    cdef bytes name
    for i in range(0, len(headers), 2):
        name = <bytes>headers[i]
        if PyBytes_GET_SIZE(name) == n and ascii_ieq(PyBytes_AS_STRING(name), n, PyBytes_AS_STRING(lower_name), n):
            return <bytes>headers[i + 1]
    return None


cdef class KeyAuthCheck(NativeCheck):
    """key_auth with the key in a header (the common case; query, cookie and hidden credentials
    take the Python path)."""

    def __init__(self, plugin, str header):
        self.plugin = plugin
        self.header = header.lower().encode("latin-1")

    cdef object run(self, list headers, bytes peer_ip, bytes client_ip, bytes forwarded_for,
                    bytes consumer):
        cdef bytes key = _header(headers, self.header)
        if not key:
            return self.plugin.missing()
        plugin = self.plugin
        hasher = plugin.verified_hasher.copy()
        hasher.update(key)
        seen = hasher.digest()
        name = plugin.verified.get(seen)
        if name is not None:
            return name
        digest = _sha256(key).digest()
        found = plugin.by_raw_digest.get(digest)
        if found is None or not compare_digest(found[0], digest):
            return plugin.invalid()
        if len(plugin.verified) >= VERIFIED_MAX:
            plugin.verified.clear()
        plugin.verified[seen] = found[1]
        return found[1]


cdef class IpFilterCheck(NativeCheck):
    def __init__(self, plugin):
        self.plugin = plugin
        self.decisions = {}

    cdef object run(self, list headers, bytes peer_ip, bytes client_ip, bytes forwarded_for,
                    bytes consumer):
        key = (peer_ip, client_ip, forwarded_for)
        allowed = self.decisions.get(key)
        if allowed is None:
            if len(self.decisions) >= 65536:
                self.decisions.clear()
            allowed = self.decisions[key] = self.plugin.allowed_for(
                peer_ip.decode(), client_ip.decode(),
                forwarded_for.decode("latin-1") if forwarded_for is not None else None)
        return None if allowed else self.plugin.refuse()


cdef class AclCheck(NativeCheck):
    def __init__(self, plugin):
        self.plugin = plugin

    cdef object run(self, list headers, bytes peer_ip, bytes client_ip, bytes forwarded_for,
                    bytes consumer):
        return self.plugin.decide(consumer.decode() if consumer is not None else None)
