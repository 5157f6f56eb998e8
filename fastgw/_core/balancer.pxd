from libc.stdint cimport uint64_t

from fastgw._core.upstream cimport Target


cdef class Balancer:
    cdef readonly list targets
    cdef Py_ssize_t count
    cdef Py_ssize_t next_index
    cdef uint64_t slow_start_ns           # 0 = no slow start
    cdef bint ramping                     # slow start is on (off while a pick falls back)

    cdef Target pick(self, bytes key, object exclude=*)   # None when no target is up
    cdef Target select(self, bytes key)   # the algorithm
    cdef Target _other_than(self, object exclude)


cdef class Single(Balancer):
    pass


cdef class RoundRobin(Balancer):
    pass


cdef class SmoothWeighted(Balancer):
    cdef list credit
    cdef long long total


cdef class LeastConn(Balancer):
    pass


cdef class WeightedRandom(Balancer):
    cdef list cumulative
    cdef long long total


cdef class P2CEwma(Balancer):
    cdef WeightedRandom picker


cdef class ConsistentHash(Balancer):
    cdef double bounded_load
    cdef Py_ssize_t size
    cdef uint64_t* ring_hash
    cdef int* ring_target


cdef class Nearest(Balancer):
    pass


cdef class ZonePreferring(Balancer):
    cdef Balancer local
    cdef Balancer everyone
    cdef double spill_over_below
