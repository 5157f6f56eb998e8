# cython: language_level=3
"""Observing finished requests: shared-memory counters, spans and the access log.

Called once per request, when it is over (answered, failed or abandoned), by the connection that
held it (fastgw/_core/protocol.pyx, ClientConnection._log), after the request let go of what it
held (target, limits, cache fill). Only sampled requests pay for a span, and only listeners
with an access log for its tuple.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

from fastgw._core.request cimport Request, request_id_of
from fastgw._core.router cimport RouteEntry
from fastgw._core.shm cimport (consumer_analytics_key, method_index, record_analytics, record_request,
                               unmatched_analytics_key)

import time

from fastgw.log import log, log_exception


cdef str trace_id(Request req):
    """The trace id in hex (W3C Trace Context §3.2.2.3), or None when the request has no trace."""
    if req.traceparent is not None:
        return req.traceparent[3:35].decode()
    if req.trace_hi or req.trace_lo:
        return f"{req.trace_hi:016x}{req.trace_lo:016x}"
    return None


cdef void record_finished(Request req, RouteEntry route, bint internal, object tracer, bytes client_ip,
                          double now):
    """The request's counts in shared memory (route metrics, GET /analytics), and its span when
    it was sampled. `route`: its route, None when none matched; `internal`: a listener of the
    gateway's own calls, left out of analytics."""
    cdef double elapsed = now - req.started if req.started else 0.0
    record_request(route.metric_slot if route is not None else 0,
                   method_index(PyBytes_AS_STRING(req.method), PyBytes_GET_SIZE(req.method)),
                   req.status, elapsed)
    if route is not None and not internal:
        # GET /analytics: usage per route, service and consumer over the last hour.
        record_analytics(route.analytics_route, elapsed, req.status >= 500)
        if route.analytics_service:
            record_analytics(route.analytics_service, elapsed, req.status >= 500)
        record_analytics(consumer_analytics_key(req.consumer), elapsed, req.status >= 500)
    elif not internal:
        # GET /history counts them too, so the dashboard's history is all the traffic.
        record_analytics(unmatched_analytics_key(), elapsed, req.status >= 500)
    if req.sampled and tracer is not None:
        export_span(req, tracer, client_ip, now)


cdef void export_span(Request req, object tracer, bytes client_ip, double now):
    """Hand a sampled request to the tracer (fastgw/server/tracing.py); only sampled requests
    pay for this."""
    route = req.rule.route if req.rule is not None else None
    ended = time.time_ns()
    parent = req.traceparent[36:52].decode() if req.traceparent is not None else None
    try:
        tracer((
            trace_id(req), f"{req.span_id:016x}", parent,
            ended - <long long>((now - req.started) * 1e9), ended,
            req.method.decode(), (req.host or b"").decode("latin-1"),
            (req.path or b"").decode("latin-1"), req.status, req.flags,
            route.name if route is not None else None,
            route.service.name if route is not None and route.service is not None else None,
            req.target.address if req.target is not None else None,
            client_ip.decode()))
    except Exception as exc:           # tracing must never break a request
        log(f"span export failed: {exc!r}", "error")


cdef void write_access_log(object sink, Request req, bytes client_ip, str upstream_uri, double now):
    """The access-log tuple, in the order fastgw/server/accesslog.py reads it."""
    route = req.rule.route if req.rule is not None else None
    sink((time.time(), request_id_of(req).decode("latin-1"),
          trace_id(req),
          client_ip.decode(), req.method.decode(), (req.host or b"").decode("latin-1"),
          (req.url or b"").decode("latin-1"), "HTTP/1.1" if req.http11 else "HTTP/1.0",
          (req.path if req.path is not None else req.url or b"").decode("latin-1"),
          req.status, req.flags,
          route.name if route is not None else None,
          route.service.name if route is not None and route.service is not None else None,
          req.target.address if req.target is not None else None,
          upstream_uri,
          req.upstream_status or None, req.attempts,
          req.head_bytes + req.body_bytes, req.bytes_out,
          now - req.started if req.started else 0.0,
          req.upstream_elapsed if req.upstream_status else None,
          req.user_agent.decode("latin-1") if req.user_agent is not None else None,
          req.profile,
          req.consumer.decode() if req.consumer is not None else None,
          req.limit_logged))
