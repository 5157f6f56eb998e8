# cython: language_level=3
"""A route's filters as the data plane sees them (filters.pxd), and the one place in the data
plane that calls Python plugin code: the request, response and log hooks of the route's chain
(fastgw/plugins/chain.py). Everything else a plugin offers (a native check, a rate policy, a
response cache, the proxies it trusts) is declared by the plugin and collected here at config
load, so the data plane never reads plugin attributes per request."""


cdef class RouteFilters:
    def __init__(self, *, tuple ratelimits=(), tuple native=None, ResponseCache cache=None,
                 tuple credential_fields=None, trusted=None, bint response_plugins=False,
                 bint log_plugins=False, chain=None):
        self.ratelimits = ratelimits
        self.native = native
        self.cache = cache
        self.credential_fields = credential_fields
        self.trusted = trusted
        self.response_plugins = response_plugins
        self.log_plugins = log_plugins
        self.chain = chain

    cdef object run_request(self, object view):
        """None (go on), a Response (answer it), or an awaitable resolving to one of those."""
        return self.chain.run_request(view)

    cdef object run_response(self, object view, object resp):
        return self.chain.run_response(view, resp)

    cdef object run_log(self, object view, object resp):
        return self.chain.run_log(view, resp)

    def __repr__(self):
        return f"RouteFilters({self.chain!r})"
