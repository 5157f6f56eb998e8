"""TLS through the gateway, with certificates generated at test time: https listeners with SNI
certificate selection, mTLS (optional and required, the client certificate as consumer),
certificates reloaded on SIGHUP without dropping connections, and https upstreams verified by
default."""
from __future__ import annotations

import http.client
import http.server
import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading

import pytest
import yaml

from certs import make_ca_and_certs
from upstreams import HOST, free_port, gateway_config, route, wait_for


def https_config(upstream, tls, plugins=(), consumers=()):
    config = gateway_config({"up": {"targets": [{"address": f"{HOST}:{upstream.port}"}]}},
                            [route("api", ["/api/**"], "up"), route("open", ["/open/**"], "up")])
    config["routes"][0]["plugins"] = list(plugins)
    config["consumers"] = list(consumers)
    port = free_port()
    config["listeners"] = [{"name": "secure", "bind": f"{HOST}:{port}", "protocol": "https", "tls": tls}]
    return config, port


def client_context(ca_file, cert=None):
    context = ssl.create_default_context(cafile=str(ca_file))
    if cert is not None:
        context.load_cert_chain(*map(str, cert))
    return context


def get(port, path, context, server_name, *, conn=None):
    """(status, body, the server certificate's CN); reuses `conn` when given."""
    conn = conn or http.client.HTTPSConnection(HOST, port, context=context, timeout=5)
    conn._server_hostname = server_name                  # SNI and the name verified
    conn.host = server_name
    if conn.sock is None:
        sock = socket.create_connection((HOST, port), timeout=5)
        conn.sock = context.wrap_socket(sock, server_hostname=server_name)
    conn.request("GET", path, headers={"Host": server_name})
    resp = conn.getresponse()
    body = resp.read()
    return resp.status, body, common_name(conn.sock), conn


def common_name(tls_socket) -> str:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_der_x509_certificate(tls_socket.getpeercert(binary_form=True))
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
def test_https_listener_picks_the_certificate_by_sni(gateway, upstream, tmp_path):
    ca, certs = make_ca_and_certs(tmp_path, ["default.test", "api.test", "wild.test"])
    config, port = https_config(upstream, {"certificates": [
        {"cert": str(certs["default.test"][0]), "key": str(certs["default.test"][1])},
        {"cert": str(certs["api.test"][0]), "key": str(certs["api.test"][1]), "sni": ["api.test"]}]})
    gateway(config)
    context = client_context(ca)
    status, body, cn, _ = get(port, "/api/x", context, "api.test")
    assert (status, cn) == (200, "api.test")
    seen = upstream.requests[-1]
    assert seen.header("x-forwarded-proto") == "https" and seen.header("host") == "api.test"
    status, _, cn, _ = get(port, "/api/x", ssl._create_unverified_context(), "other.test")
    assert (status, cn) == (200, "default.test")                 # unknown name: the default
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, OSError)):
        with socket.create_connection((HOST, port), timeout=5) as sock:
            old.wrap_socket(sock, server_hostname="api.test")


def test_mtls_required_and_optional_with_the_certificate_as_consumer(gateway, upstream, tmp_path):
    ca, certs = make_ca_and_certs(tmp_path, ["gw.test"])
    client_ca, clients = make_ca_and_certs(tmp_path, ["client-a", "stranger"], prefix="clients-")
    server_cert = {"cert": str(certs["gw.test"][0]), "key": str(certs["gw.test"][1])}
    consumers = [{"name": "svc-a", "credentials": {"mtls": [{"subject": "client-a"}]}}]
    config, port = https_config(upstream, {"certificates": [server_cert], "client_ca": str(client_ca),
                                           "client_auth": "required"}, [{"mtls_auth": {}}], consumers)
    gateway(config)
    status, _, _, _ = get(port, "/api/x", client_context(ca, clients["client-a"]), "gw.test")
    assert status == 200 and upstream.requests[-1].header("x-consumer-name") == "svc-a"
    with pytest.raises((ssl.SSLError, OSError, http.client.HTTPException)):
        get(port, "/api/x", client_context(ca), "gw.test")          # no certificate: no handshake
    optional, port2 = https_config(upstream, {"certificates": [server_cert], "client_ca": str(client_ca),
                                              "client_auth": "optional"}, [{"mtls_auth": {}}], consumers)
    gateway(optional)
    assert get(port2, "/open/x", client_context(ca), "gw.test")[0] == 200     # no plugin, no cert: fine
    assert get(port2, "/api/x", client_context(ca), "gw.test")[0] == 401
    assert get(port2, "/api/x", client_context(ca, clients["stranger"]), "gw.test")[0] == 403
    assert get(port2, "/api/x", client_context(ca, clients["client-a"]), "gw.test")[0] == 200


def test_certificates_reload_on_sighup_without_dropping_connections(gateway, upstream, tmp_path):
    ca, certs = make_ca_and_certs(tmp_path, ["old.test", "new.test"])
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(certs["old.test"][0], live_cert)
    shutil.copy(certs["old.test"][1], live_key)
    config, port = https_config(upstream, {"certificates": [{"cert": str(live_cert), "key": str(live_key)}]})
    gw = gateway(config)
    context = ssl._create_unverified_context()
    status, _, cn, kept = get(port, "/open/1", context, "any.test")
    assert (status, cn) == (200, "old.test")
    live_cert.write_bytes(certs["new.test"][0].read_bytes())          # renewed in place
    live_key.write_bytes(certs["new.test"][1].read_bytes())
    gw.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: get(port, "/open/2", context, "any.test")[2] == "new.test", timeout=10)
    status, _, cn, _ = get(port, "/open/3", context, "any.test", conn=kept)   # the old connection lives on
    assert (status, cn) == (200, "old.test")


class TlsHttpUpstream:
    """An HTTPS server (http.server + ssl) that answers with what it saw."""

    def __init__(self, cert, key):
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                body = json.dumps({"path": self.path, "host": self.headers["host"]}).encode()
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_https_upstreams_are_verified_by_default(gateway, tmp_path):
    ca, certs = make_ca_and_certs(tmp_path, ["backend.test"])
    backend = TlsHttpUpstream(*certs["backend.test"])
    try:
        def service(tls):
            return {"scheme": "https", "targets": [{"address": f"{HOST}:{backend.port}"}], "tls": tls}
        config = gateway_config({"trusted": service({"ca": str(ca), "sni": "backend.test"}),
                                 "default": service({}),
                                 "unverified": service({"verify": False})},
                                [route("t", ["/t/**"], "trusted"), route("d", ["/d/**"], "default"),
                                 route("u", ["/u/**"], "unverified")])
        gw = gateway(config)
        resp = gw.request("GET", "/t/x")
        assert resp.status == 200 and resp.json()["path"] == "/t/x"
        resp = gw.request("GET", "/d/x")                   # the system CAs do not know our test CA
        assert resp.status == 502 and resp.json()["error"]["code"] == "upstream_error"
        assert gw.request("GET", "/u/x").status == 200
    finally:
        backend.close()


def test_tls_config_errors_name_the_file_and_key(tmp_path):
    ca, certs = make_ca_and_certs(tmp_path, ["a.test"])
    config = gateway_config({"up": {"targets": [{"address": f"{HOST}:1"}], "scheme": "https",
                                    "tls": {"ca": "missing-ca.pem"}}}, [route("r", ["/**"], "up")])
    config["listeners"] = [
        {"name": "s", "bind": f"{HOST}:{free_port()}", "protocol": "https",
         "tls": {"certificates": [{"cert": "nope.pem", "key": str(certs["a.test"][1])}]}},
        {"name": "m", "bind": f"{HOST}:{free_port()}", "protocol": "https",
         "tls": {"certificates": [{"cert": str(certs["a.test"][0]), "key": str(certs["a.test"][1])}],
                 "client_auth": "required"}}]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "fastgw", "check", "-c", str(path)], capture_output=True, text=True)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "listeners[0].tls.certificates[0]" in text and "nope.pem" in text
    assert "listeners[1].tls.client_ca" in text
    assert "services.up.tls.ca" in text and "missing-ca.pem" in text
