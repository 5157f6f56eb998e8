"""Is a listener address already served by another process?

Workers bind their listeners with SO_REUSEPORT so that the kernel spreads connections over them.
The same option would let a second gateway (or anything else that sets it) bind the same port
without an error, and the kernel would then split the traffic between two configs. So before
workers bind an address, the supervisor tries it once without SO_REUSEPORT: that bind fails with
EADDRINUSE when anyone listens there, as nginx's start does.
"""
from __future__ import annotations

import errno
import socket

from fastgw.config.validate import parse_bind


def address_in_use(bind: str) -> bool:
    host, port = parse_bind(bind)
    for family, kind, proto, _, address in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE):
        with socket.socket(family, kind, proto) as probe:
            # SO_REUSEADDR: connections in TIME_WAIT from an earlier run are not "in use"
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
                raise
    return False


def busy_listeners(listeners, already_ours=frozenset()) -> list[tuple[int, str]]:
    """(index, bind) of each listener whose address someone else serves; `already_ours`: binds
    the running config's workers hold (a reload keeps them)."""
    return [(i, spec.bind) for i, spec in enumerate(listeners)
            if spec.bind not in already_ours and address_in_use(spec.bind)]
