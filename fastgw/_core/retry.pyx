# cython: language_level=3
"""Retry decisions and the retry budget: may a failed try of a request be sent again?

The rules are the README's "Retries" (Load balancing) and "Stale pooled connections" (Proxy behaviour):
a request goes to another target, up to `retries.attempts` times, after a connect failure (any
method: nothing reached the target), a reset before any response, a listed 5xx status or a per-try
timeout (only idempotent methods, RFC 9110 §9.2.2, whose whole request is held and before any of
the answer went to the client), within Envoy's retry budget. The client connection
(fastgw/_core/protocol.pyx) does the acting: it asks here, then picks the other target
(`Balancer.pick(key, exclude)`) and starts the new try.
"""
from fastgw._core.buffer cimport monotonic
from fastgw._core.upstream cimport (UPSTREAM_CONNECT_FAILED, UPSTREAM_CONNECT_TIMEOUT, UPSTREAM_RESET,
                                    UPSTREAM_TIMEOUT)

# RFC 9110 §9.2.2: the methods whose intended effect is the same however often they are sent.
cdef frozenset IDEMPOTENT = frozenset([b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"])


cdef bint budget_allows(Service service):
    """Envoy's retry budget: retries in flight stay under budget_ratio of the requests in
    flight (but MIN_RETRY_CONCURRENCY are always allowed), so a sick service is not sent twice
    its traffic. Counted per worker (README, Retries: `budget_ratio`)."""
    if service.budget_ratio < 0:
        return True
    return service.retries_in_flight < max(MIN_RETRY_CONCURRENCY, service.budget_ratio * service.in_flight)


cdef bint may_retry(Request req, Service service):
    """Can `req` be sent again after its target answered badly or not at all? Only an
    idempotent request (RFC 9110 §9.2.2) that is held whole, before any of the answer went to
    the client, within retries.attempts and the retry budget."""
    return req.replay is not None and req.body_done and not req.response_started and \
        req.method in IDEMPOTENT and req.retried_elsewhere < service.retries and \
        budget_allows(service)


cdef bint retries_failure(Request req, Service service, int error):
    """May `req` go to another target after its try failed with `error` (an UPSTREAM_* kind)?"""
    if error == UPSTREAM_CONNECT_FAILED or error == UPSTREAM_CONNECT_TIMEOUT:
        # Nothing reached the target: any method may go to another one, if we hold it all.
        return service.retry_connect and req.replay is not None and \
            req.retried_elsewhere < service.retries and budget_allows(service)
    if error == UPSTREAM_RESET and service.retry_reset or \
            error == UPSTREAM_TIMEOUT and 504 in service.retry_statuses and \
            (req.deadline == 0 or monotonic() < req.deadline):
        # Reset, or the per-try timeout (retried like a 504 when 504 is listed) before any
        # response: the target may have acted on the request, so only an idempotent one is sent
        # again (RFC 9110 §9.2.2).
        return may_retry(req, service)
    return False


cdef bint retries_stale_connection(Request req, int error):
    """Is this a pooled connection the upstream closed as we reused it (RFC 9112 §9.3.1.1), with
    an idempotent request still held whole? Then the same try goes on over a fresh connection to
    the same target; it is not counted as a retry (README: "Stale pooled connections"), and a
    fresh connection is never reused, so this cannot loop."""
    return error == UPSTREAM_RESET and req.upstream_reused and req.replay is not None and \
        (req.body_done or not req.body_bytes) and req.method in IDEMPOTENT


cdef void count_retry(Request req, Service service):
    """`req` goes to another target: one more of retries.attempts spent, and the request is on a
    retry for the budget (once, however many it makes)."""
    if not req.retry_counted:
        req.retry_counted = True
        service.retries_in_flight += 1
    req.retried_elsewhere += 1
