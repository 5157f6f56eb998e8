"""acl: allow or deny by the groups of the consumer an authentication plugin identified."""
from __future__ import annotations

import msgspec

from fastgw.plugins.api import Plugin, Response


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

    def on_request(self, req):
        consumer = req.consumer
        if consumer is None:
            return Response.error(401, "unauthorized", "this route needs an identified consumer")
        groups = set(consumer.groups)
        if groups & set(self.config.deny_groups) or \
                (self.config.allow_groups and not groups & set(self.config.allow_groups)):
            return Response.error(403, "forbidden", f"consumer {consumer.name} may not use this route")
        return None
