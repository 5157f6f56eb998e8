# cython: language_level=3
"""Deadlines without a timer per request.

A connection keeps one deadline and at most one timer handle. Moving the deadline later (every
request, every read) is a store; when the handle fires it looks at the deadline in force and
re-arms itself if that is still ahead. A new handle is made only when the deadline moves earlier.
"""
from fastgw._core.buffer cimport monotonic


cdef class TimedProtocol:
    cdef void arm(self, double deadline):
        """Set the deadline (0 = none)."""
        self.deadline = deadline
        if deadline <= 0:
            return
        if self.timer is None or self.timer_at > deadline:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = deadline
            self.timer = self.loop.call_later(max(deadline - monotonic(), 0), self._on_timer)

    cdef void disarm(self):
        self.deadline = 0
        if self.timer is not None:
            self.timer.cancel()           # also drops the handle's reference to us
            self.timer = None

    cdef double due(self):
        """The deadline in force; subclasses may compute it from their state. 0 = none."""
        return self.deadline

    cdef void expired(self):
        pass

    def _on_timer(self):
        self.timer = None
        cdef double deadline = self.due()
        if deadline <= 0:
            return
        if monotonic() < deadline:
            self.arm(deadline)
        else:
            self.expired()
