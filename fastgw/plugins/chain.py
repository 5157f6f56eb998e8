"""A route's plugins, in the order they run, and running them.

The data plane (fastgw/_core/protocol.pyx) calls `run_request` once per request on a route that has
a chain; it gets None (go on), a Response (answer it), or an awaitable that resolves to one of those
(some plugin is async: the rest of the chain runs in it).
"""
from __future__ import annotations

import traceback

from fastgw._core.filters import RouteFilters
from fastgw.api import Plugin, Response
from fastgw.plugins.client_address import TrustedProxies
from fastgw.log import log


class Chain:
    __slots__ = ("plugins", "request_plugins", "response_plugins", "log_plugins", "native", "ratelimits",
                 "cache", "credential_fields", "trusted")

    def __init__(self, plugins: tuple) -> None:
        self.plugins = plugins
        # rate_limit and cache are the data plane's, once the request plugins let the request through.
        data_plane = [p for p in plugins if getattr(p, "data_plane", False)]
        self.ratelimits = tuple(p.policy for p in data_plane if hasattr(p, "policy"))
        # Whose Forwarded / X-Real-IP go upstream: a peer some plugin of the route trusts as a proxy.
        trusted = [p.trusted for p in plugins if getattr(p, "trusted", None) is not None and p.trusted.networks]
        self.trusted = TrustedProxies([str(net) for t in trusted for net in t.networks]) if trusted else None
        self.cache = next((p.response_cache for p in data_plane if hasattr(p, "response_cache")), None)
        self.request_plugins = tuple(p for p in plugins if p.phase in ("rewrite", "access")
                                     and not getattr(p, "data_plane", False))
        self.credential_fields = _credential_fields(self.request_plugins)
        self.response_plugins = tuple(p for p in plugins if p.phase == "response" or _overrides(p, "on_response"))
        self.log_plugins = tuple(p for p in plugins if p.phase == "log" or _overrides(p, "on_log"))
        # When every plugin has a data-plane check (fastgw/_core/native.pyx) and none looks at the
        # answer, the data plane runs those checks and no Python request is ever built.
        natives = [p.native() if hasattr(p, "native") else None for p in self.request_plugins]
        self.native = tuple(natives) if all(natives) and not self.response_plugins and not self.log_plugins \
            else None

    def route_filters(self) -> RouteFilters:
        """What this chain asks of the data plane, typed for it (fastgw/_core/filters.pxd)."""
        return RouteFilters(ratelimits=self.ratelimits, native=self.native, cache=self.cache,
                            credential_fields=self.credential_fields, trusted=self.trusted,
                            response_plugins=bool(self.response_plugins), log_plugins=bool(self.log_plugins),
                            chain=self)

    def run_request(self, req):
        for i, plugin in enumerate(self.request_plugins):
            result = plugin.on_request(req)
            if result is None:
                continue
            if isinstance(result, Response):
                return result
            if hasattr(result, "__await__"):
                return self._finish_async(req, i, result)
            raise TypeError(f"plugin {plugin.name}: on_request returned {type(result).__name__}, "
                            f"not a Response or None")
        return None

    async def _finish_async(self, req, i: int, pending):
        result = await pending
        for plugin in self.request_plugins[i + 1:]:
            if result is not None:
                break
            result = plugin.on_request(req)
            if hasattr(result, "__await__"):
                result = await result
        if result is not None and not isinstance(result, Response):
            raise TypeError(f"on_request returned {type(result).__name__}, not a Response or None")
        return result

    def run_response(self, req, resp: Response) -> None:
        for plugin in self.response_plugins:
            try:
                plugin.on_response(req, resp)
            except Exception:                      # the answer still goes out
                _report(plugin, "on_response")

    def run_log(self, req, resp: Response) -> None:
        for plugin in self.log_plugins:
            try:
                plugin.on_log(req, resp)
            except Exception:
                _report(plugin, "on_log")

    def __repr__(self) -> str:
        return f"Chain({', '.join(p.name for p in self.plugins)})"


def _credential_fields(plugins: tuple) -> tuple | None:
    """The request headers (lower-case bytes) where the route's authentication plugins may find a
    credential, or None when none runs: the cache keys a request they let through without naming
    a consumer by a digest of these (a whole Cookie header when a plugin reads a cookie)."""
    authenticators = [p for p in plugins if getattr(p, "authenticates", False)]
    if not authenticators:
        return None
    fields = {"authorization"}
    for plugin in authenticators:
        config = getattr(plugin, "config", None)
        header = getattr(config, "header", None)
        if isinstance(header, str):
            fields.add(header.lower())
        if getattr(config, "cookie", None):
            fields.add("cookie")
    return tuple(sorted(name.encode("latin-1") for name in fields))


def _overrides(plugin, method: str) -> bool:
    """Plugins of the request phases may also look at the answer (CORS headers on it)."""
    return getattr(type(plugin), method) is not getattr(Plugin, method)


def _report(plugin, where: str) -> None:
    log(f"plugin {plugin.name} failed in {where}", "error", traceback.format_exc())
