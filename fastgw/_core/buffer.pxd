# A growable byte buffer for building heads and small bodies, turned into one bytes object per
# write: the transport gets a fresh object each time, so no region it still holds is reused.

cdef class WriteBuffer:
    cdef char* data
    cdef Py_ssize_t length
    cdef Py_ssize_t capacity

    cdef int _grow(self, Py_ssize_t extra) except -1
    cdef int write(self, const char* src, Py_ssize_t n) except -1
    cdef int write_bytes(self, bytes src) except -1
    cdef int write_str(self, str src) except -1
    cdef int write_int(self, long long value) except -1
    cdef int write_hex(self, unsigned long long value) except -1
    cdef int write_hex_fixed(self, unsigned long long value, int digits) except -1
    cdef bytes take(self)


cdef double monotonic() noexcept nogil
cdef unsigned long long random64() noexcept
cdef bint ascii_ieq(const char* a, Py_ssize_t alen, const char* lower_b, Py_ssize_t blen) noexcept
cdef bytes ascii_lower(bytes value)
cdef unsigned long long hash64(const char* data, Py_ssize_t n) noexcept
