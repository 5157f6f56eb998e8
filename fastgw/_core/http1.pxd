# The HTTP/1 codec: the grammar of RFC 9110 / RFC 9112 that both directions read and write, once.
# Bytes in, facts out: no connection state, no asyncio.

include "headers.pxi"

cdef enum ConnectionOption:
    CONN_CLOSE = 1
    CONN_KEEP_ALIVE = 2
    CONN_NAMES = 4                  # the Connection header names other fields
    CONN_UPGRADE = 8                # ... among them Upgrade: the client asks to switch protocols

cdef enum:
    HEAD_FIELDS_MAX = 64            # field lines scan_fields reads; more: llhttp reads the head

# One field line of a head, as offsets into it (scan_fields).
ctypedef struct FieldSpan:
    Py_ssize_t name                 # the line's start
    Py_ssize_t colon                # the name's end
    Py_ssize_t value                # the value's start (leading whitespace skipped)
    Py_ssize_t value_end
    int known                       # KnownHeader of the name


cdef bint plain_text(const unsigned char* s, Py_ssize_t n) noexcept
cdef Py_ssize_t plain_field(const unsigned char* s, Py_ssize_t pos, Py_ssize_t end, Py_ssize_t* colon,
                            Py_ssize_t* vstart, Py_ssize_t* vend) noexcept
cdef Py_ssize_t scan_fields(const unsigned char* s, Py_ssize_t pos, Py_ssize_t end, FieldSpan* spans,
                            Py_ssize_t max_fields) noexcept
cdef Py_ssize_t end_of_head(bytes data) noexcept
cdef int status_line(object data, int* status) noexcept

cdef long long content_length_of(const char* s, Py_ssize_t n) noexcept
cdef long long parse_content_length(bytes value) except -2
cdef int connection_options(const char* s, Py_ssize_t n) noexcept
cdef int connection_flags(bytes value)
cpdef list connection_tokens(bytes value)
cpdef list drop_named(list headers, list names)


cdef inline bint hop_by_hop_field(int known, const char* name, Py_ssize_t n) noexcept:
    """RFC 9110 §7.6.1 connection-specific fields (Connection, Keep-Alive, TE, Trailer, Upgrade),
    plus Proxy-*: never forwarded (RFC 9110 §11.7: credentials and options for this proxy). A
    proxy must also drop what Connection names: connection_tokens() and drop_named().
    Content-Length and Transfer-Encoding are handled apart: the proxy re-frames bodies.
    `known` is the name's KnownHeader (scan_fields gives it)."""
    if known == H_CONNECTION or known == H_KEEP_ALIVE or known == H_TE or known == H_TRAILER or \
            known == H_UPGRADE:
        return True
    if known == H_PROXY_AUTHORIZATION:
        return True
    return known == H_OTHER and n > 6 and _name_is(name, b"proxy-", 6)
