from fastgw._core.request cimport Request
from fastgw._core.upstream cimport Service


cdef enum:
    MIN_RETRY_CONCURRENCY = 3     # retries always allowed in flight, whatever the budget

cdef bint budget_allows(Service service)
cdef bint may_retry(Request req, Service service)
cdef bint retries_failure(Request req, Service service, int error)
cdef bint retries_stale_connection(Request req, int error)
cdef void count_retry(Request req, Service service)


# What runs for every proxied request is inlined where it is used: the budget's bookkeeping, and
# the status test (a 2xx or 4xx answer costs one compare, no call).

cdef inline bint retries_status(Request req, Service service, int status):
    """Is the answer's `status` one the service retries (a listed 5xx, README: `retry_on`), and
    may `req` be retried? The discarded answer's connection is then closed by the caller."""
    return status >= 500 and status in service.retry_statuses and may_retry(req, service)


cdef inline void count_request(Request req, Service service) noexcept:
    """`req` is one of the service's requests in flight: the budget's denominator."""
    service.in_flight += 1
    req.service_counted = True


cdef inline void uncount_request(Request req, Service service) noexcept:
    """`req` no longer weighs on the budget (answered, or become a tunnel); callers test
    `req.service_counted` first, so that a request not counted costs no call."""
    req.service_counted = False
    service.in_flight -= 1
    if req.retry_counted:
        service.retries_in_flight -= 1
