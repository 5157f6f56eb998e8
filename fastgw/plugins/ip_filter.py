"""ip_filter: allow or deny by client address (IPv4 and IPv6 CIDR).

The client address follows fastgw/plugins/client_address.py: the socket peer's, unless the peer is
one of `trusted_proxies` (then a PROXY protocol address or X-Forwarded-For is believed).
"""
from __future__ import annotations

import msgspec

from fastgw._core.native import IpFilterCheck
from fastgw.api import Plugin, Response
from fastgw.plugins.client_address import DECISIONS_KEPT, TrustedProxies, check_cidrs, networks


class IpFilter(Plugin):
    name = "ip_filter"
    phase = "access"
    priority = 3000

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        allow: list[str] = []                      # empty: everyone not denied
        deny: list[str] = []                       # wins over allow
        trusted_proxies: list[str] = []

        def __post_init__(self):
            check_cidrs(self.allow + self.deny + self.trusted_proxies)

    def __init__(self, config):
        super().__init__(config)
        self.allow, self.deny = networks(config.allow), networks(config.deny)
        self.trusted = TrustedProxies(config.trusted_proxies)
        self.decisions: dict[tuple, bool] = {}

    def client_address(self, peer_ip: str, client_ip: str, forwarded_for: str | None):
        return self.trusted.client_address(peer_ip, client_ip, forwarded_for)
    def allowed_for(self, peer_ip: str, client_ip: str, forwarded_for: str | None) -> bool:
        address = self.client_address(peer_ip, client_ip, forwarded_for)
        return address is not None and not any(address in net for net in self.deny) and \
            (not self.allow or any(address in net for net in self.allow))

    def native(self):
        return IpFilterCheck(self)

    @staticmethod
    def refuse():
        return Response.error(403, "forbidden", "your address may not use this route")

    def on_request(self, req):
        # Parsing addresses and walking networks takes microseconds; the same client comes back
        # again and again, so the answer is remembered per (peer, PROXY address, X-Forwarded-For).
        key = (req.peer_ip, req.client_ip, req.forwarded_for)
        allowed = self.decisions.get(key)
        if allowed is None:
            if len(self.decisions) >= DECISIONS_KEPT:
                self.decisions.clear()
            allowed = self.decisions[key] = self.allowed_for(*key)
        return None if allowed else self.refuse()
