# Answers the gateway makes itself (errors, `respond` routes, the echo service, plugin and
# handler answers, cache hits), written into the connection's WriteBuffer. Each writer returns
# whether the connection must close after the answer (it reads the caller's `closing` and
# adds the reasons of this answer); the caller keeps that and writes the buffer out.
from fastgw._core.buffer cimport WriteBuffer
from fastgw._core.cache cimport CachedResponse
from fastgw._core.request cimport Request
from fastgw._core.router cimport HeaderEdits

cdef enum:
    DISCARD_LIMIT = 65536         # unread body bytes we read and drop to keep a connection open


cdef inline bint can_discard(Request req) noexcept:
    """Is the unread rest of the body small enough to read and drop (keeping the connection)?"""
    if req.chunked:
        return False
    return (req.content_length if req.content_length > 0 else 0) - req.body_bytes <= DISCARD_LIMIT


cdef bytes status_line(int status)        # "HTTP/1.1 <status> <reason>\r\n"
cdef list status_lines()                  # the table status_line reads, indexed by status
cdef bytes date_header()                  # "date: <IMF-fixdate>\r\n", made once per second
cdef bint write_connection_header(WriteBuffer o, Request req, bint closing) except -1
cdef bint finish_head_and_body(WriteBuffer o, Request req, bytes body, int retry_after,
                               bint request_id, bint closing) except -1
cdef bint write_simple(WriteBuffer o, Request req, int status, bytes content_type, bytes body,
                       int retry_after, bint closing) except -1
cdef bint write_error(WriteBuffer o, Request req, int status, str code, str message,
                      bint closing) except -1
cdef bint write_answer(WriteBuffer o, Request req, int status, list fields, bytes body,
                       HeaderEdits edits, bint closing) except -1
cdef bint write_respond(WriteBuffer o, Request req, int status, list fields, bint plugins,
                        bint closing) except -1
cdef bint write_cached(WriteBuffer o, Request req, CachedResponse entry, int status, list headers,
                       bytes state, double now, bint closing) except -1
cdef bytes echo_body(Request req, bytes client_ip)
cdef bytes error_body_with_request_id(Request req, bytes body)
