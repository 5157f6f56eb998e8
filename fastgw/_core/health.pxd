# Target health over the shared target words (fastgw/_core/health.pyx). `now`: shm's monotonic_ns.
# Each answers for an untracked slot (-1, no active segment) as for a healthy target.

cdef bint target_available(int slot, unsigned long long now) noexcept   # up, not ejected, circuit lets through
cdef unsigned long long target_up_since(int slot, unsigned long long now) noexcept   # slow start; 0: never came back
cdef void target_end(int slot, double seconds, bint failed) noexcept     # a result: counters and EWMA
cdef unsigned long long target_ewma_ns(int slot) noexcept   # 0: no sample or not tracked

cdef bint circuit_admit(int slot, unsigned long long now) noexcept
cdef int circuit_record(int slot, unsigned long long now, bint failed, unsigned long long window_ns,
                        unsigned long long min_requests, double failure_ratio,
                        unsigned long long open_ns, unsigned long long trials) noexcept
cdef bint circuit_is_open(int slot) noexcept

cdef long long target_failure(int slot) noexcept      # consecutive failures after this one, -1 untracked
cdef void target_success(int slot) noexcept
cdef bint target_eject(int slot, unsigned long long now, unsigned long long base_ns,
                       unsigned long long max_ns) noexcept
