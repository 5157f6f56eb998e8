# cython: language_level=3
"""One canonical form for what a request names: its path and its Host.

The router matches exactly the path that is sent upstream, so every form a backend could read as
another path is either brought to one spelling here or refused: a backend that decodes `%2F`,
merges `//` or resolves `..` on its own must never see a path the router did not judge. The same
for Host: the value routes are chosen by is the value forwarded.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.string cimport memcmp

cdef const char* HEX_UPPER = b"0123456789ABCDEF"


cdef inline int _hex_value(unsigned char c) noexcept:
    if 48 <= c <= 57:                            # 0-9
        return c - 48
    if 97 <= c <= 102:                           # a-f
        return c - 87
    if 65 <= c <= 70:                            # A-F
        return c - 55
    return -1


cdef inline bint _unreserved(unsigned char c) noexcept:
    """RFC 3986 §2.3."""
    return (b'a' <= c <= b'z') or (b'A' <= c <= b'Z') or (b'0' <= c <= b'9') or \
        c == b'-' or c == b'.' or c == b'_' or c == b'~'


cdef inline bint _is_dot_segment(const char* s, Py_ssize_t n) noexcept:
    return (n == 1 and s[0] == b'.') or (n == 2 and s[0] == b'.' and s[1] == b'.')


cdef Py_ssize_t _remove_dot_segments(char* p, Py_ssize_t n) except -1:
    """RFC 3986 §5.2.4 in place on an absolute path whose slashes are already merged; the new
    length. A segment that is a dot segment with parameters (`..;x`, Tomcat and Spring read it as
    `..`) cannot be given one meaning, so it is refused."""
    cdef Py_ssize_t r = 0, w = 0, start, end
    while r < n:
        start = r + 1                            # p[r] is '/'
        end = start
        while end < n and p[end] != b'/':
            end += 1
        if end - start >= 2 and p[start] == b'.' and \
                (p[start + 1] == b';' or (p[start + 1] == b'.' and end - start >= 3 and p[start + 2] == b';')):
            raise ValueError("dot segment with parameters in path")
        if _is_dot_segment(p + start, end - start):
            if end - start == 2:                 # "..": drop the last segment written
                while w > 0:
                    w -= 1
                    if p[w] == b'/':
                        break
            if end >= n:                         # "/a/.." and "/a/." end in a directory: "/a/"
                p[w] = b'/'
                w += 1
        else:
            p[w] = b'/'
            w += 1
            while start < end:
                p[w] = p[start]
                w += 1
                start += 1
        r = end
    if w == 0:
        p[0] = b'/'
        w = 1
    return w


cpdef bytes canonical_path(bytes path, bint keep_escaped_slashes=False):
    """The one spelling of an origin-form path (no query), RFC 3986 §6.2.2:

    - escapes of unreserved characters are decoded (`/%61dmin` is `/admin`), other escapes are
      upper-cased; a malformed escape, or an encoded NUL, is refused;
    - an encoded `/` or `\\` (`%2F`, `%5C`) and a raw `\\` are refused, since backends disagree on
      whether they separate segments; `keep_escaped_slashes` keeps them as they are instead
      (Envoy's `path_with_escaped_slashes_action: KEEP_UNCHANGED`);
    - repeated slashes are merged (`//admin` is `/admin`), then dot segments removed (§5.2.4).

    Raises ValueError (a 400) with a message that names the problem."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(path), i = 0, w = 0
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(path)
    cdef char* out
    cdef int hi, lo, value
    cdef unsigned char c
    if n == 0 or s[0] != b'/':
        raise ValueError("request path must start with '/'")
    out = <char*>PyMem_Malloc(n)
    if out == NULL:
        raise MemoryError()
    try:
        while i < n:
            c = s[i]
            if c == b'%':
                hi = _hex_value(s[i + 1]) if i + 2 < n else -1
                lo = _hex_value(s[i + 2]) if i + 2 < n else -1
                if hi < 0 or lo < 0:
                    raise ValueError("invalid percent-encoding in path")
                value = hi * 16 + lo
                i += 3
                if value == 0:
                    raise ValueError("encoded NUL in path")
                if (value == b'/' or value == b'\\') and not keep_escaped_slashes:
                    raise ValueError("encoded '/' or '\\' in path")
                if _unreserved(<unsigned char>value):
                    out[w] = <char>value
                    w += 1
                else:
                    out[w] = b'%'
                    out[w + 1] = HEX_UPPER[hi]
                    out[w + 2] = HEX_UPPER[lo]
                    w += 3
                continue
            if c == b'\\' and not keep_escaped_slashes:
                raise ValueError("'\\' in path")
            i += 1
            if c == b'/' and w > 0 and out[w - 1] == b'/':
                continue                         # merge "//"
            out[w] = <char>c
            w += 1
        w = _remove_dot_segments(out, w)
        if w == n and memcmp(out, s, n) == 0:
            return path
        return PyBytes_FromStringAndSize(out, w)
    finally:
        PyMem_Free(out)


cdef inline bint _name_char(unsigned char c) noexcept:
    """Characters of a DNS name or IPv4 address in a Host (a strict subset of RFC 3986's
    reg-name: no sub-delims, no escapes, which no backend reads alike)."""
    return (b'a' <= c <= b'z') or (b'A' <= c <= b'Z') or (b'0' <= c <= b'9') or \
        c == b'-' or c == b'.' or c == b'_'


cpdef bytes canonical_host(bytes host):
    """The one spelling of a Host field value or an absolute-form authority (RFC 9110 §7.2,
    RFC 3986 §3.2.2-3.2.3): `name[:port]` or `[IPv6]:port`, lower-cased, one trailing dot of the
    name removed (`example.com.` is `example.com`), an empty port dropped. Whitespace, userinfo
    (`user@`, RFC 9110 §4.2.4), escapes and any other character are refused: ValueError (a 400).
    An empty value stays empty (RFC 9112 §3.2: no authority)."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(host), i = 0, name_end, port_start, digits
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(host)
    cdef bint changed = False
    cdef unsigned char c
    cdef long port = 0
    if n == 0:
        return host
    if s[0] == b'[':                             # IP-literal: hex digits, ':' and '.' only
        i = 1
        while i < n and s[i] != b']':
            c = s[i]
            if not (_hex_value(c) >= 0 or c == b':' or c == b'.'):
                raise ValueError(_host_problem(c))
            if b'A' <= c <= b'F':
                changed = True
            i += 1
        if i >= n or i < 3:
            raise ValueError("invalid IPv6 literal in Host")
        name_end = i + 1
    else:
        while i < n and s[i] != b':':
            c = s[i]
            if not _name_char(c):
                raise ValueError(_host_problem(c))
            if b'A' <= c <= b'Z':
                changed = True
            if c == b'.' and (i == 0 or s[i - 1] == b'.'):
                raise ValueError("empty label in Host")
            i += 1
        name_end = i
        if name_end == 0:
            raise ValueError("empty name in Host")
        if s[name_end - 1] == b'.':
            changed = True                       # one trailing dot: the same name, fully qualified
    port_start = name_end
    if port_start < n:
        if s[port_start] != b':':
            raise ValueError("invalid Host")
        digits = n - port_start - 1
        if digits == 0:
            changed = True                       # "host:" means "host" (RFC 3986 §6.2.3)
        elif digits > 5:
            raise ValueError("invalid port in Host")
        for i in range(port_start + 1, n):
            if not (b'0' <= s[i] <= b'9'):
                raise ValueError(_host_problem(s[i]) if s[i] != b':' else "invalid port in Host")
            port = port * 10 + (s[i] - 48)
        if port > 65535:
            raise ValueError("invalid port in Host")
    if not changed:
        return host
    name = host[:name_end].lower()
    if name.endswith(b"."):
        name = name[:-1]
    if n - port_start > 1:
        return name + host[port_start:]
    return name


cdef str _host_problem(unsigned char c):
    if c == b' ' or c == b'\t':
        return "whitespace in Host"
    if c == b'@':
        return "userinfo in Host"
    return "invalid character in Host"
