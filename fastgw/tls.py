"""TLS contexts: for `https` listeners (certificates chosen by SNI, optional mTLS) and for `https`
upstream services (verification on by default).

A listener's socket keeps one outer SSLContext for its whole life; its SNI callback hands every new
handshake the context of the current certificate set, held by a `ServerTls` that a reload updates.
So a reload (SIGHUP) re-reads the certificate files and new connections get the new certificates,
while connections already open keep theirs and are not dropped.
"""
from __future__ import annotations

import os
import ssl

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
CLIENT_AUTH = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


class TlsFileError(ValueError):
    """A certificate, key or CA that cannot be used; `path` is its config key."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path


def resolve(path: str | None, base_dir: str | None) -> str | None:
    """Relative file names are relative to the config file's directory."""
    if path is None or os.path.isabs(path) or base_dir is None:
        return path
    return os.path.join(base_dir, path)


def _server_context(tls, where: str, cert: str, key: str, base_dir: str | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = VERSIONS[tls.min_version]
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(resolve(cert, base_dir), resolve(key, base_dir))
    except (OSError, ssl.SSLError) as exc:
        raise TlsFileError(where, f"cannot load certificate {cert!r} with key {key!r}: {exc}") from None
    context.verify_mode = CLIENT_AUTH[tls.client_auth]
    if tls.client_ca:
        try:
            context.load_verify_locations(resolve(tls.client_ca, base_dir))
        except (OSError, ssl.SSLError) as exc:
            raise TlsFileError("client_ca", f"cannot load client CA {tls.client_ca!r}: {exc}") from None
    return context


class ServerTls:
    """The certificate set of one https listener, swappable at runtime."""

    def __init__(self, tls, base_dir: str | None = None):
        self.default, self.exact, self.wildcard = self._build(tls, base_dir)
        # The outer context: what the socket is created with; its callback picks the real one.
        self.outer = _server_context(tls, "certificates[0]", tls.certificates[0].cert,
                                     tls.certificates[0].key, base_dir)
        self.outer.sni_callback = self._select

    @staticmethod
    def _build(tls, base_dir):
        default, exact, wildcard = None, {}, {}
        for i, spec in enumerate(tls.certificates):
            context = _server_context(tls, f"certificates[{i}]", spec.cert, spec.key, base_dir)
            if not spec.sni and default is None:
                default = context
            for name in spec.sni:
                name = name.lower().rstrip(".")
                if name.startswith("*."):
                    wildcard.setdefault(name[2:], context)
                else:
                    exact.setdefault(name, context)
        if default is None:                        # every certificate names its hosts: the first
            default = next(iter(exact.values()), None) or next(iter(wildcard.values()))
        return default, exact, wildcard

    @classmethod
    def prepare(cls, tls, base_dir: str | None = None) -> tuple:
        """Load a certificate set (raises TlsFileError) for `apply` to switch to."""
        return cls._build(tls, base_dir)

    def apply(self, built: tuple) -> None:
        """New certificates for new handshakes; open connections keep theirs."""
        self.default, self.exact, self.wildcard = built

    def _select(self, ssl_object, server_name, _outer):
        context = self.default
        if server_name:
            name = server_name.lower().rstrip(".")
            context = self.exact.get(name) or self.wildcard.get(name.partition(".")[2]) or self.default
        ssl_object.context = context
        return None


def client_context(tls, base_dir: str | None = None, where: str = "tls") -> ssl.SSLContext:
    """For connections to `https` targets."""
    try:
        context = ssl.create_default_context(cafile=resolve(tls.ca, base_dir))
    except (OSError, ssl.SSLError) as exc:
        raise TlsFileError(f"{where}.ca", f"cannot load CA {tls.ca!r}: {exc}") from None
    context.set_alpn_protocols(["http/1.1"])
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.client_cert:
        try:
            context.load_cert_chain(resolve(tls.client_cert, base_dir), resolve(tls.client_key, base_dir))
        except (OSError, ssl.SSLError) as exc:
            raise TlsFileError(f"{where}.client_cert", f"cannot load client certificate: {exc}") from None
    return context


def peer_subjects(peercert: dict | None) -> list[str]:
    """A verified client certificate's CN, DNS names and email addresses."""
    if not peercert:
        return []
    names = [value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"]
    names += [value for kind, value in peercert.get("subjectAltName", ()) if kind in ("DNS", "email")]
    return names
