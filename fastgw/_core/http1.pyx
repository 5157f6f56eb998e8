# cython: language_level=3
"""The HTTP/1 codec: every rule of RFC 9110 / RFC 9112 the data plane reads or writes, once.

It knows bytes, not connections: the client side (protocol.pyx), the upstream side
(upstream.pyx), the admin server (fastgw/admin/http.py), the aggregation loopback
(fastgw/handlers/loopback.py) and the plugin fetch (fastgw/plugins/fetch.py) read and write heads
with what is here. llhttp (httptools) still reads every head the fast scan here does not fully
validate; the scan only ever accepts what llhttp would (tests/test_model_headscan.py).

Field names the data plane acts on are a generated enum (headers.pxi, from tools/gen_headers.py):
`known_header(name, n)` maps a received name to it, so each side switches on one int instead of
chains of compares.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.string cimport memchr, memcmp

cdef extern from "string.h":
    void* memmem(const void* haystack, size_t haystacklen, const void* needle, size_t needlelen)


# RFC 9110 §5.6.2 tchar: the bytes a field name (and a method, a token) may hold.
cdef bint TCHAR[256]
_TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
for _c in bytearray(_TCHARS.encode()):
    TCHAR[_c] = True


# --- reading a head ------------------------------------------------------------------------------

cdef bint plain_text(const unsigned char* s, Py_ssize_t n) noexcept:
    """RFC 9110 §5.5 field-vchar / SP / HTAB (a reason phrase's set too, RFC 9112 §4): no
    control bytes."""
    cdef Py_ssize_t i
    for i in range(n):
        if (s[i] < 0x20 and s[i] != 0x09) or s[i] == 0x7f:
            return False
    return True


cdef Py_ssize_t plain_field(const unsigned char* s, Py_ssize_t pos, Py_ssize_t end, Py_ssize_t* colon,
                            Py_ssize_t* vstart, Py_ssize_t* vend) noexcept:
    """The field line at `pos` of a head (`end`: where its blank line ends) when it is plainly
    valid (RFC 9112 §5): a token name, the colon right after it (§5.1: no whitespace before it),
    then text, ending in CRLF. Sets the name's end (`colon`) and the value's bounds (leading
    whitespace skipped); returns the offset of the next line. -1 for anything else (obs-fold,
    RFC 9112 §5.2; a bare LF; a bad name; space before the colon; control bytes): the caller hands
    the head to llhttp, which decides."""
    cdef const unsigned char* nl = <const unsigned char*>memchr(s + pos, b'\n', end - pos)
    cdef Py_ssize_t eol, c, a, b
    if nl == NULL:
        return -1
    eol = nl - s
    if eol == pos or s[eol - 1] != b'\r':
        return -1
    c = pos
    while c < eol and TCHAR[s[c]]:
        c += 1
    if c == pos or s[c] != b':':
        return -1
    a = c + 1
    while a < eol - 1 and (s[a] == b' ' or s[a] == b'\t'):
        a += 1
    b = eol - 1                           # trailing whitespace stays, as llhttp leaves it
    if not plain_text(s + a, b - a):
        return -1
    colon[0], vstart[0], vend[0] = c, a, b
    return eol + 1


cdef Py_ssize_t scan_fields(const unsigned char* s, Py_ssize_t pos, Py_ssize_t end, FieldSpan* spans,
                            Py_ssize_t max_fields) noexcept:
    """The head scanner of both directions: every field line from `pos` (just after the start
    line) to the blank line that ends the head at `end`, checked by plain_field() before the
    caller acts on any. Fills `spans` with each line's offsets and KnownHeader; returns how many,
    or -1 when a line is not plain or there are more than `max_fields` (llhttp reads those)."""
    cdef Py_ssize_t count = 0, eol, colon, vstart, vend
    while pos < end - 2:
        if count == max_fields:
            return -1
        eol = plain_field(s, pos, end, &colon, &vstart, &vend)
        if eol < 0:
            return -1
        spans[count].name = pos
        spans[count].colon = colon
        spans[count].value = vstart
        spans[count].value_end = vend
        spans[count].known = known_header(<const char*>s + pos, colon - pos)
        count += 1
        pos = eol
    return count


cdef Py_ssize_t end_of_head(bytes data) noexcept:
    """Offset just past the first CRLFCRLF (the empty line that ends a head, RFC 9112 §2.1)
    when the head starts `data`, or -1."""
    cdef const char* s = PyBytes_AS_STRING(data)
    cdef const char* found = <const char*>memmem(s, PyBytes_GET_SIZE(data), b"\r\n\r\n", 4)
    return (found - s) + 4 if found is not NULL else -1


cdef int status_line(object data, int* status) noexcept:
    """11 or 10 and the status code when `data` starts with "HTTP/1.x NNN " (RFC 9112 §4:
    status-line = HTTP-version SP status-code SP [ reason-phrase ]), else 0. Read off the raw
    bytes to spare two Python calls per response; llhttp validates the same line."""
    if type(data) is not bytes or PyBytes_GET_SIZE(<bytes>data) < 13:
        return 0
    cdef const char* s = PyBytes_AS_STRING(<bytes>data)
    if memcmp(s, b"HTTP/1.", 7) != 0 or s[8] != b' ' or s[12] != b' ':
        return 0
    if not (b'1' <= s[9] <= b'5' and b'0' <= s[10] <= b'9' and b'0' <= s[11] <= b'9'):
        return 0
    status[0] = (s[9] - 48) * 100 + (s[10] - 48) * 10 + (s[11] - 48)
    if s[7] == b'1':
        return 11
    if s[7] == b'0':
        return 10
    return 0


# --- field values ----------------------------------------------------------------------------------

cdef long long content_length_of(const char* s, Py_ssize_t n) noexcept:
    """RFC 9110 §8.6: Content-Length = 1*DIGIT. -1 if invalid: signs, spaces, empty, more than
    18 digits, and a list, even of equal values (RFC 9110 §8.6 lets a recipient take those; we
    refuse them, RFC 9112 §6.3 rule 5, as a repeated field is refused: no framing guesswork)."""
    cdef Py_ssize_t i
    cdef long long result = 0
    if n == 0 or n > 18:
        return -1
    for i in range(n):
        if s[i] < 48 or s[i] > 57:
            return -1
        result = result * 10 + (s[i] - 48)
    return result


cdef long long parse_content_length(bytes value) except -2:
    """content_length_of() a received value: its length, or -1 if invalid."""
    return content_length_of(PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value))


cdef int connection_options(const char* s, Py_ssize_t n) noexcept:
    """The options of a Connection header (RFC 9110 §7.6.1: a list of tokens, case-insensitive):
    CONN_CLOSE, CONN_KEEP_ALIVE, and CONN_NAMES when it also names other fields (then
    connection_tokens() lists them), with CONN_UPGRADE when one is Upgrade (RFC 9110 §7.8)."""
    cdef Py_ssize_t i = 0, start, end
    cdef int flags = 0
    while i < n:
        while i < n and (s[i] == b' ' or s[i] == b'\t' or s[i] == b','):
            i += 1
        start = i
        while i < n and s[i] != b',':
            i += 1
        end = i
        while end > start and (s[end - 1] == b' ' or s[end - 1] == b'\t'):
            end -= 1
        if end == start:
            continue
        if end - start == 5 and _name_is(s + start, b"close", 5):
            flags |= CONN_CLOSE
        elif end - start == 10 and _name_is(s + start, b"keep-alive", 10):
            flags |= CONN_KEEP_ALIVE
        else:
            if end - start == 7 and _name_is(s + start, b"upgrade", 7):
                flags |= CONN_UPGRADE
            flags |= CONN_NAMES
    return flags


cdef int connection_flags(bytes value):
    """connection_options() of a received Connection value."""
    return connection_options(PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value))


cpdef list connection_tokens(bytes value):
    """Lower-case tokens of a Connection header, minus close/keep-alive: the fields it names,
    which go no further than this hop (RFC 9110 §7.6.1)."""
    cdef list out = []
    cdef bytes t
    for p in value.split(b","):
        t = p.strip().lower()
        if t and t != b"close" and t != b"keep-alive":
            out.append(t)
    return out


cpdef list drop_named(list headers, list names):
    """Headers ([name, value, ...]) without the ones a Connection header named (RFC 9110 §7.6.1)."""
    out = []
    for i in range(0, len(headers), 2):
        if (<bytes>headers[i]).lower() not in names:
            out.append(headers[i])
            out.append(headers[i + 1])
    return out


# --- Python-visible: what the Python-level readers and writers of HTTP/1 share ------------------

def header_id(bytes name):
    """known_header() of `name`: its KnownHeader value, 0 for a name not in headers.pxi."""
    return known_header(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name))


def hop_by_hop(bytes name):
    """hop_by_hop_field() of `name` (http1.pxd)."""
    cdef const char* s = PyBytes_AS_STRING(name)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(name)
    return hop_by_hop_field(known_header(s, n), s, n)


def content_length(bytes value):
    """parse_content_length() of `value`: the length, or -1 if it is not 1*DIGIT."""
    return parse_content_length(value)


def connection_option_flags(bytes value):
    """connection_flags() of a Connection value: CONN_* bits (close 1, keep-alive 2, names 4,
    upgrade 8)."""
    return connection_flags(value)


def valid_field_name(str name):
    """RFC 9110 §5.1: field-name = token (1*tchar)."""
    return bool(name) and all(c in _TCHARS for c in name)


def splits_head(str value):
    """The value holds a byte that would end the field line or the head early when written:
    CR or LF (RFC 9112 §5: a field line ends at CRLF) or NUL (RFC 9110 §5.5: never valid)."""
    return "\r" in value or "\n" in value or "\x00" in value


def field_lines(fields):
    """`name: value` lines, each ending in CRLF (RFC 9112 §5), of (name, value) str pairs."""
    return "".join([f"{name}: {value}\r\n" for name, value in fields])


def request_head(str method, str target, fields=(), str raw_fields=""):
    """A request head (RFC 9112 §3: method SP request-target SP HTTP-version CRLF, the field
    lines, then the empty line), as latin-1 bytes. `raw_fields`: lines already written."""
    return (f"{method} {target} HTTP/1.1\r\n" + field_lines(fields) + raw_fields + "\r\n").encode("latin-1")


def response_head(int status, str reason, fields=()):
    """A response head (RFC 9112 §4: HTTP-version SP status-code SP reason-phrase CRLF, the
    field lines, then the empty line), as latin-1 bytes."""
    return (f"HTTP/1.1 {status} {reason}\r\n" + field_lines(fields) + "\r\n").encode("latin-1")


def chunk(data):
    """One chunk of a chunked body (RFC 9112 §7.1: chunk-size in hex CRLF chunk-data CRLF), of
    any bytes-like `data`."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"          # RFC 9112 §7.1: last-chunk, no trailer fields, the final CRLF
