"""The control plane as the admin API sees it: what it may read of the running gateway and what it
may ask of it. The supervisor (fastgw/server/supervisor.py) implements it; the admin package
(fastgw/admin/api.py) is written against it and is started through `StartAdmin`, which the CLI
hands to `serve()`, so that the server never imports the admin package (README.md, "Layers")."""
from __future__ import annotations

from typing import Awaitable, Callable, Protocol

from fastgw._core.shm import Segment
from fastgw.config.model import Admin as AdminSpec, Config, Target
from fastgw.config.store import ConfigStore


class ControlPlane(Protocol):
    store: ConfigStore        # the current config, its version, validation of changes, backups
    segment: Segment          # shared memory: counters, histograms, target health (read here)
    current_slots: dict       # shared-memory slots of the running config's routes, targets, listeners
    running: Config           # what the workers run: the current config with DNS names resolved
    started: float            # time.time() when the gateway started
    draining: bool
    reloads: dict             # {"ok": n, "error": n}

    def status(self) -> dict:
        """GET /status: version, uptime, the last reload, each worker."""

    def ready(self) -> bool:
        """Every worker runs the current config, and the gateway is not draining."""

    def workers_running(self) -> int:
        """How many workers are up."""

    def dns_state(self, target: Target) -> str | None:
        """resolved, stale or unresolved for a target named by DNS; None for an IP literal."""

    async def change(self, edit: Callable[[], dict]) -> int:
        """Validate, apply and persist the document `edit()` returns; the new config version."""

    async def reload(self) -> int:
        """Re-read the config file and apply it; the new config version."""

    async def purge_cache(self, spec: dict) -> int:
        """Remove matching cached answers in every worker; how many."""


class AdminHandle(Protocol):
    """What the supervisor keeps of a started admin API."""

    def configure(self, spec: AdminSpec | None) -> None:
        """A reload's admin settings (token, allowed hosts)."""

    async def close(self) -> None: ...


# (control plane, the config's `admin:`) -> the admin API, listening.
StartAdmin = Callable[[ControlPlane, AdminSpec], Awaitable[AdminHandle]]
