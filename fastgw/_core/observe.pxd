# What a finished request leaves behind: its counts in shared memory (fastgw/_core/shm.pyx), its
# span for the tracer (fastgw/server/tracing.py) and its access-log line
# (fastgw/server/accesslog.py). Nothing here changes how the request is answered.
from fastgw._core.request cimport Request
from fastgw._core.router cimport RouteEntry


cdef str trace_id(Request req)
cdef void record_finished(Request req, RouteEntry route, bint internal, object tracer, bytes client_ip,
                          double now)
cdef void export_span(Request req, object tracer, bytes client_ip, double now)
cdef void write_access_log(object sink, Request req, bytes client_ip, str upstream_uri, double now)
