from fastgw._core.buffer cimport WriteBuffer
from fastgw._core.filters cimport RouteFilters

cdef enum:
    MAX_CAPTURES = 32

cdef enum RouteKind:
    ROUTE_PROXY = 0
    ROUTE_RESPOND = 1
    ROUTE_ECHO = 2
    ROUTE_HANDLER = 3               # answered by Python (aggregation, gRPC): body held, then handler

cdef struct Captures:
    int count
    Py_ssize_t start[MAX_CAPTURES]
    Py_ssize_t end[MAX_CAPTURES]


cdef class HeaderEdits:
    cdef frozenset drop          # lower-case names removed from the message (remove, set, rename keys)
    cdef dict rename             # lower-case old name -> new name
    cdef list append             # [(name, value)] written after the kept headers (set + add)

    cdef bint drops(self, bytes lower_name)
    cdef int write_renamed(self, WriteBuffer buf, bytes lower_name, bytes value) except -1
    cdef int write_appended(self, WriteBuffer buf) except -1


cdef int write_fields(WriteBuffer buf, list headers, HeaderEdits edits) except -1


cdef class RouteEntry:
    cdef readonly str name
    cdef readonly int index
    cdef readonly int priority
    cdef readonly int kind
    cdef readonly object service          # fastgw._core.upstream.Service, or None
    cdef unsigned long long methods_mask  # 0 = any method
    cdef readonly bytes host_rewrite      # None = keep the client's Host
    cdef readonly bytes strip_prefix
    cdef readonly bytes query_rewrite     # None = keep the client's query
    cdef readonly HeaderEdits request_edits
    cdef readonly HeaderEdits response_edits
    cdef readonly double timeout          # 0 = the service's read timeout
    cdef readonly long long max_body      # -1 = the listener's limit
    cdef readonly int respond_status
    cdef readonly bytes respond_head      # status line + headers, without Connection and the blank line
    cdef readonly bytes respond_body
    cdef readonly list respond_fields     # its header fields [name, value, ...], no Content-Length:
                                          # what response edits and plugins start from
    cdef readonly int metric_slot         # shared-memory counters (fastgw._core.shm), -1 = none
    cdef readonly tuple conditions        # header / query / profile conditions, None = none
    cdef readonly RouteFilters plugins    # what its plugins ask of the data plane; None = no plugins
    cdef readonly object handler          # ROUTE_HANDLER: async handle(view, params, body, forward)
    cdef readonly dict shapes             # client profile -> fastgw.handlers.shape.Shape, or None
    cdef readonly unsigned long long analytics_route     # shm.analytics_key of the route (0: none)
    cdef readonly unsigned long long analytics_service   # ... and of its service


cdef class PathRule:
    """One path pattern of a route: what the trie stores and a match returns."""
    cdef readonly RouteEntry route
    cdef readonly str pattern
    cdef readonly tuple capture_names     # name per capture slot (None for an anonymous /** tail)
    cdef list template                    # rewrite.path: bytes literals and int capture slots, or None
    cdef list segments                    # parse_pattern(pattern), None for a regex

    cdef int write_path(self, WriteBuffer buf, const char* path, Py_ssize_t n, Captures* caps) except -1
    cdef dict params(self, bytes path, Captures* caps)


cdef class PathNode:
    cdef dict children                    # segment bytes -> PathNode
    cdef PathNode param
    cdef list rules                       # rules ending exactly here
    cdef list tail_rules                  # rules whose /** or {rest...} tail starts here

    cdef PathNode child(self, const char* seg, Py_ssize_t n)


cdef class HostTable:
    cdef PathNode root
    cdef list regex_rules                 # [(compiled regex, PathRule)] by priority; a trie hit wins ties


cdef class Router:
    cdef dict exact_hosts                 # host (lower case) -> HostTable
    cdef list wildcard_hosts              # [(suffix, HostTable)], longest suffix first
    cdef HostTable any_host
    cdef bint has_hosts
    cdef bint use_priorities
    cdef readonly dict method_bits
    cdef readonly list routes

    cdef readonly tuple profiles          # client profiles: ((name, conditions), ...) in file order

    cdef PathRule match(self, bytes method, const char* host, Py_ssize_t host_len,
                        const char* path, Py_ssize_t path_len, Captures* caps,
                        list headers=*, bytes query=*, object profile=*)
    cdef PathRule _match(self, bytes method, const char* host, Py_ssize_t host_len,
                         const char* path, Py_ssize_t path_len, Captures* caps)
    cdef object classify(self, list headers, bytes query)
