"""acl: allow or deny by the groups of the consumer an authentication plugin identified."""
from __future__ import annotations

import msgspec

from fastgw._core.native import AclCheck
from fastgw.api import Plugin, Response


class Acl(Plugin):
    name = "acl"
    phase = "access"
    priority = 950                                 # after every authentication plugin

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        allow_groups: list[str] = []
        deny_groups: list[str] = []

        def __post_init__(self):
            if not self.allow_groups and not self.deny_groups:
                raise ValueError("name allow_groups or deny_groups")

    def setup(self, context):
        self.groups = {c.name: frozenset(c.groups) for c in context.consumers}
        self.allow, self.deny = frozenset(self.config.allow_groups), frozenset(self.config.deny_groups)

    def native(self):
        return AclCheck(self)

    def decide(self, name: str | None):
        if name is None:
            return Response.error(401, "unauthorized", "this route needs an identified consumer")
        groups = self.groups.get(name, frozenset())
        if groups & self.deny or (self.allow and not groups & self.allow):
            return Response.error(403, "forbidden", f"consumer {name} may not use this route")
        return None

    def on_request(self, req):
        return self.decide(req.consumer.name if req.consumer is not None else None)
