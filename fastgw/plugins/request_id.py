"""request_id: the request id (taken from the client's header when valid, else generated — the data
plane always does that and logs it) under the header name you choose, upstream and back to the
client."""
from __future__ import annotations

import msgspec

from fastgw.api import Plugin


class RequestId(Plugin):
    name = "request_id"
    phase = "rewrite"
    priority = 100000

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        header: str = "x-request-id"
        echo_downstream: bool = True               # the client gets it on the answer too

    def on_request(self, req):
        if self.config.header.lower() != "x-request-id":
            req.headers.set(self.config.header, req.request_id)
        return None

    def on_response(self, req, resp):
        if self.config.echo_downstream:
            resp.headers.set(self.config.header, req.request_id)
