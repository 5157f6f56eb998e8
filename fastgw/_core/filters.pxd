from fastgw._core.cache cimport ResponseCache


cdef class RouteFilters:
    """What a route's plugins ask of the data plane, typed, built once per route at config load
    (fastgw/plugins/chain.py `Chain.route_filters`). The data plane reads these fields; it calls
    Python plugins only through `run_request`, `run_response` and `run_log`."""
    cdef readonly tuple ratelimits        # fastgw._core.ratelimit.Policy, in the chain's order
    cdef readonly tuple native            # one NativeCheck per request plugin, or None: Python runs
    cdef readonly ResponseCache cache     # the route's response cache, or None
    cdef readonly tuple credential_fields # lower-case names a credential may come in, or None
    cdef readonly object trusted          # fastgw.plugins.client_address.TrustedProxies, or None
    cdef readonly bint response_plugins   # some plugin looks at the answer
    cdef readonly bint log_plugins        # some plugin looks at the finished exchange
    cdef readonly object chain            # the Python side: fastgw.plugins.chain.Chain

    cdef object run_request(self, object view)
    cdef object run_response(self, object view, object resp)
    cdef object run_log(self, object view, object resp)
