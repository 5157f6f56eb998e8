# cython: language_level=3
"""The record of one HTTP request (fields in request.pxd) and the values derived from it once."""
cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize

from fastgw._core.buffer cimport random64

cdef const char* HEXDIGITS = b"0123456789abcdef"


@cython.final
@cython.freelist(64)
cdef class Request:
    pass


cdef bytes request_id_of(Request req):
    """The id the request is known by upstream, in its answer and in the log: the client's
    X-Request-Id when it was valid, else 128 random bits in hex, made on first use."""
    cdef char text[32]
    cdef unsigned long long bits = 0
    cdef int i
    if req.request_id is None:
        for i in range(32):
            if i % 16 == 0:
                bits = random64()
            text[i] = HEXDIGITS[bits & 15]
            bits >>= 4
        req.request_id = PyBytes_FromStringAndSize(text, 32)
    return req.request_id
