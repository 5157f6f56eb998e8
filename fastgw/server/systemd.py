"""systemd service notifications (sd_notify(3)) for `Type=notify` and `Type=notify-reload` units:
READY=1 once every worker serves, RELOADING=1 (with MONOTONIC_USEC) then READY=1 around a reload,
STOPPING=1 when draining starts. A no-op when $NOTIFY_SOCKET is not set."""
from __future__ import annotations

import os
import socket


def notify(*assignments: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":                 # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(assignments).encode(), address)
    except OSError:
        return False                      # the service manager went away: nothing to tell
    return True
