# cython: language_level=3
"""Answers made here rather than by an upstream: the bytes of their heads and bodies.

They know nothing of the connection but its `closing` decision, which they read and return
(fastgw/_core/answers.pxd), so the same answers serve any connection that owns a WriteBuffer.
What runs before them (routing, response plugins, the cache lookup) stays with the caller.
"""
from cpython.bytes cimport PyBytes_GET_SIZE
from libc.time cimport time as c_time

from fastgw._core.buffer cimport WriteBuffer, ascii_lower
from fastgw._core.cache cimport CachedResponse
from fastgw._core.request cimport Request, request_id_of
from fastgw._core.router cimport HeaderEdits, RouteEntry, write_fields

from email.utils import formatdate
from http import HTTPStatus

import msgspec

cdef list STATUS_LINES = [None] * 600
for _status in HTTPStatus:
    STATUS_LINES[_status.value] = f"HTTP/1.1 {_status.value} {_status.phrase}\r\n".encode()
for _code in range(100, 600):
    if STATUS_LINES[_code] is None:
        STATUS_LINES[_code] = f"HTTP/1.1 {_code} Status {_code}\r\n".encode()

_json_encode = msgspec.json.Encoder().encode


cdef bytes status_line(int status):
    return <bytes>STATUS_LINES[status]


cdef list status_lines():
    return STATUS_LINES


cdef long _date_second = -1
cdef bytes _date_line = b""


cdef bytes date_header():
    """ "date: <IMF-fixdate>\r\n" (RFC 9110 §6.6.1), formatted once per second."""
    global _date_second, _date_line
    cdef long now = <long>c_time(NULL)           # not time.time(): a module lookup and a float
    if now != _date_second:
        _date_second = now
        _date_line = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
    return _date_line


cdef bytes _header_value(list headers, bytes lower_name):
    for i in range(0, len(headers), 2):
        if ascii_lower(<bytes>headers[i]) == lower_name:
            return <bytes>headers[i + 1]
    return b""


cdef bint write_connection_header(WriteBuffer o, Request req, bint closing) except -1:
    """The rate-limit lines and the connection field of any answer (RFC 9112 §9.3, §9.6)."""
    if req.limit_headers is not None:     # every answer of a rate-limited route says its quota
        o.write_bytes(req.limit_headers)
    if not req.body_done and not can_discard(req) or req.upgrade is not None:
        # Its body will not be read to the end, or an upgrade was refused: what the client
        # sends next may not be HTTP.
        closing = True
    if closing or not req.keep_alive:
        closing = True
        o.write(b"connection: close\r\n", 19)
    elif not req.http11:
        o.write(b"connection: keep-alive\r\n", 24)
    return closing


cdef bint finish_head_and_body(WriteBuffer o, Request req, bytes body, int retry_after,
                               bint request_id, bint closing) except -1:
    """The end of an answer made here: its length, request id (unless told it is written),
    Retry-After, connection header, the blank line and the body (none for HEAD)."""
    o.write(b"content-length: ", 16)
    o.write_int(PyBytes_GET_SIZE(body))
    o.write(b"\r\n", 2)
    if request_id:
        o.write(b"x-request-id: ", 14)
        o.write_bytes(request_id_of(req))
        o.write(b"\r\n", 2)
    if retry_after > 0:
        o.write(b"retry-after: ", 13)
        o.write_int(retry_after)
        o.write(b"\r\n", 2)
    closing = write_connection_header(o, req, closing)
    o.write(b"\r\n", 2)
    if req.method != b"HEAD":
        o.write_bytes(body)
    req.response_started = True
    req.bytes_out += o.length
    return closing


cdef bint write_simple(WriteBuffer o, Request req, int status, bytes content_type, bytes body,
                       int retry_after, bint closing) except -1:
    o.write_bytes(<bytes>STATUS_LINES[status])
    o.write_bytes(date_header())
    o.write(b"content-type: ", 14)
    o.write_bytes(content_type)
    o.write(b"\r\n", 2)
    return finish_head_and_body(o, req, body, retry_after, True, closing)


cdef bint write_error(WriteBuffer o, Request req, int status, str code, str message,
                      bint closing) except -1:
    """Our JSON error, with the request id in it; a 503 says when to come back (RFC 9110
    §10.2.3), a 429 when the limit lets the next request in (RFC 6585 §4)."""
    cdef bytes rid = request_id_of(req)
    body = _json_encode({"error": {"status": status, "code": code, "message": message,
                                   "request_id": rid.decode("latin-1")}})
    return write_simple(o, req, status, b"application/json", body,
                        1 if status == 503 else req.retry_after if status == 429 else 0, closing)


cdef bytes error_body_with_request_id(Request req, bytes body):
    """A plugin's answer in our error shape gets the request id into its body, as every other
    error has it."""
    return body[:-2] + b',"request_id":' + _json_encode(request_id_of(req).decode("latin-1")) + b"}}"


cdef bint write_answer(WriteBuffer o, Request req, int status, list fields, bytes body,
                       HeaderEdits edits, bint closing) except -1:
    """A whole answer made here (plugin, handler, reshaped JSON): head, length, body."""
    req.status = status
    o.write_bytes(<bytes>STATUS_LINES[status])
    o.write_bytes(date_header())
    write_fields(o, fields, edits)
    # Once: a response plugin (request_id) may have put it among the fields already.
    return finish_head_and_body(o, req, body, 0, not _header_value(fields, b"x-request-id"), closing)


cdef bint write_respond(WriteBuffer o, Request req, int status, list fields, bint plugins,
                        bint closing) except -1:
    """A `respond` route's answer: the head compiled with the config as it is, unless response
    edits or (`plugins`) response plugins changed it; `status` and `fields` are after them."""
    cdef RouteEntry route = req.rule.route
    if route.response_edits is None and not plugins:
        o.write_bytes(route.respond_head)
    else:
        req.status = status
        o.write_bytes(<bytes>STATUS_LINES[status])
        write_fields(o, fields, route.response_edits)
        o.write(b"content-length: ", 16)
        o.write_int(PyBytes_GET_SIZE(route.respond_body))
        o.write(b"\r\n", 2)
    o.write_bytes(date_header())
    closing = write_connection_header(o, req, closing)
    o.write(b"\r\n", 2)
    if req.method != b"HEAD":
        o.write_bytes(route.respond_body)
    req.response_started = True
    req.bytes_out += o.length
    return closing


cdef bint write_cached(WriteBuffer o, Request req, CachedResponse entry, int status, list headers,
                       bytes state, double now, bint closing) except -1:
    """A stored answer (fastgw/_core/cache.pyx), with its Age (RFC 9111 §5.1) and X-Cache
    (`state`: HIT or STALE); `status` and `headers` are after the response plugins."""
    req.status = status
    o.write_bytes(<bytes>STATUS_LINES[status])
    write_fields(o, headers, req.rule.route.response_edits)
    o.write_bytes(date_header())
    o.write(b"age: ", 5)
    o.write_int(<long long>(now - entry.stored))
    o.write(b"\r\nx-cache: ", 11)
    o.write_bytes(state)
    o.write(b"\r\n", 2)
    return finish_head_and_body(o, req, entry.body, 0, True, closing)


cdef bytes echo_body(Request req, bytes client_ip):
    """The echo service's JSON: the request as the gateway read it."""
    headers = {"host": req.host.decode("latin-1")}
    for i in range(0, len(req.headers), 2):
        headers[req.headers[i].decode("latin-1").lower()] = req.headers[i + 1].decode("latin-1")
    body = b"".join(req.body_buffer) if req.body_buffer else b""
    req.body_buffer = None
    return _json_encode({
        "method": req.method.decode(), "path": req.path.decode("latin-1"),
        "query": req.query[1:].decode("latin-1"), "http_version": "1.1" if req.http11 else "1.0",
        "client_ip": client_ip.decode(), "request_id": request_id_of(req).decode(),
        "route": req.rule.route.name, "headers": headers,
        "body": body.decode("utf-8", "replace"),
    })
