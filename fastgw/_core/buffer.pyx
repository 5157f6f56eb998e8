# cython: language_level=3
"""WriteBuffer and the small C helpers every data-plane module uses."""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.string cimport memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

import os

cdef const char* HEX = b"0123456789abcdef"

# xorshift64* state: request ids and span ids need uniqueness, not secrecy.
cdef unsigned long long _rng_state = int.from_bytes(os.urandom(8), "little") | 1


cdef double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef unsigned long long random64() noexcept:
    global _rng_state
    _rng_state ^= _rng_state >> 12
    _rng_state ^= _rng_state << 25
    _rng_state ^= _rng_state >> 27
    return _rng_state * 0x2545F4914F6CDD1DULL


def reseed():
    """Called in each worker after fork so workers do not share a random sequence."""
    global _rng_state
    _rng_state = int.from_bytes(os.urandom(8), "little") | 1


cdef bint ascii_ieq(const char* a, Py_ssize_t alen, const char* lower_b, Py_ssize_t blen) noexcept:
    """Case-insensitive compare of `a` with an already lower-case `lower_b`."""
    cdef Py_ssize_t i
    cdef char c
    if alen != blen:
        return False
    for i in range(alen):
        c = a[i]
        if c >= 65 and c <= 90:
            c = c + 32
        if c != lower_b[i]:
            return False
    return True


cdef bytes ascii_lower(bytes value):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value), i
    cdef const char* src = PyBytes_AS_STRING(value)
    for i in range(n):
        if src[i] >= 65 and src[i] <= 90:
            break
    else:
        return value
    cdef bytes out = PyBytes_FromStringAndSize(src, n)
    cdef char* dst = PyBytes_AS_STRING(out)
    for i in range(n):
        if dst[i] >= 65 and dst[i] <= 90:
            dst[i] = dst[i] + 32
    return out


cdef class WriteBuffer:
    def __cinit__(self):
        self.capacity = 1024
        self.length = 0
        self.data = <char*>PyMem_Malloc(self.capacity)
        if self.data is NULL:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self.data)

    cdef int _grow(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t need = self.length + extra
        cdef Py_ssize_t cap = self.capacity
        while cap < need:
            cap *= 2
        cdef char* grown = <char*>PyMem_Realloc(self.data, cap)
        if grown is NULL:
            raise MemoryError()
        self.data = grown
        self.capacity = cap
        return 0

    cdef int write(self, const char* src, Py_ssize_t n) except -1:
        if self.length + n > self.capacity:
            self._grow(n)
        memcpy(self.data + self.length, src, n)
        self.length += n
        return 0

    cdef int write_bytes(self, bytes src) except -1:
        return self.write(PyBytes_AS_STRING(src), PyBytes_GET_SIZE(src))

    cdef int write_str(self, str src) except -1:
        return self.write_bytes(src.encode("latin-1"))

    cdef int write_int(self, long long value) except -1:
        cdef char tmp[24]
        cdef int i = 24
        cdef bint negative = value < 0
        cdef unsigned long long v = <unsigned long long>(-value if negative else value)
        while True:
            i -= 1
            tmp[i] = <char>(48 + v % 10)
            v //= 10
            if v == 0:
                break
        if negative:
            i -= 1
            tmp[i] = b'-'
        return self.write(tmp + i, 24 - i)

    cdef int write_hex(self, unsigned long long value) except -1:
        cdef char tmp[16]
        cdef int i = 16
        while True:
            i -= 1
            tmp[i] = HEX[value & 15]
            value >>= 4
            if value == 0:
                break
        return self.write(tmp + i, 16 - i)

    cdef int write_hex_fixed(self, unsigned long long value, int digits) except -1:
        cdef char tmp[16]
        cdef int i
        for i in range(digits - 1, -1, -1):
            tmp[i] = HEX[value & 15]
            value >>= 4
        return self.write(tmp, digits)

    cdef bytes take(self):
        """Return the contents as bytes and empty the buffer."""
        cdef bytes out = PyBytes_FromStringAndSize(self.data, self.length)
        self.length = 0
        return out


# FNV-1a folded through the splitmix64 finaliser: a fixed 64-bit hash (never Python's per-process
# randomised one), so every worker and every host agrees (ring positions, rate-limit keys).
cdef unsigned long long hash64(const char* data, Py_ssize_t n) noexcept:
    cdef unsigned long long h = 14695981039346656037ULL
    cdef Py_ssize_t i
    for i in range(n):
        h ^= <unsigned char>data[i]
        h *= 1099511628211ULL
    # splitmix64 finaliser: FNV's low bits are weak, ring positions need all 64 mixed
    h ^= h >> 30
    h *= 0xbf58476d1ce4e5b9ULL
    h ^= h >> 27
    h *= 0x94d049bb133111ebULL
    h ^= h >> 31
    return h
