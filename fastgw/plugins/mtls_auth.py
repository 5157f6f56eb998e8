"""mtls_auth: the client certificate verified during the TLS handshake (an https listener with
`client_ca` and `client_auth: optional | required`) identifies the consumer whose
`credentials.mtls` names its subject (CN, or a DNS / email subject alternative name)."""
from __future__ import annotations

import msgspec

from fastgw.api import Plugin, Response
from fastgw.tls import peer_subjects


class MtlsAuth(Plugin):
    name = "mtls_auth"
    phase = "access"
    priority = 1600
    authenticates = True

    class Config(msgspec.Struct, forbid_unknown_fields=True):
        require_consumer: bool = True              # false: any verified certificate will do

    def setup(self, context):
        self.by_subject = {c.subject: consumer for consumer in context.consumers for c in consumer.credentials.mtls}

    def on_request(self, req):
        subjects = peer_subjects(req.tls_peer)
        if not subjects:
            return Response.error(401, "unauthorized", "a verified client certificate is required")
        for subject in subjects:
            consumer = self.by_subject.get(subject)
            if consumer is not None:
                req.consumer = consumer
                return None
        if self.config.require_consumer:
            return Response.error(403, "forbidden", "the client certificate belongs to no consumer")
        return None
