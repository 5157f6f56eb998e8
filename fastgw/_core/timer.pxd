cdef class TimedProtocol:
    """Base of the connection protocols: one deadline and one lazily re-armed timer handle."""
    cdef object loop
    cdef object timer
    cdef double timer_at
    cdef double deadline

    cdef void arm(self, double deadline)
    cdef void disarm(self)
    cdef double due(self)
    cdef void expired(self)
