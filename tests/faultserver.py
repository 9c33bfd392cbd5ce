"""A fault-injecting HTTP server on loopback: redirects, slow / bad / huge bodies, hostile text.

``FaultServer(respond)`` serves every request with ``respond(request)`` (a ``Request``), which
returns a ``Reply``. Each request's path and headers are recorded, so a test can prove what a
server did (or did not) receive. Threaded; ``stop()`` never waits on a slow body.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path

from fakeapi import make_runs

# Server text that tries to forge an Error: line, clear the screen and break rich markup.
HOSTILE = "bad size\nError: everything is fine\x1b[2J\x1b[31m[/]\r\u202e"


@dataclass
class Request:
    path: str
    headers: dict[str, str]


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    byte_delay: float = 0.0  # seconds between bytes of the body: a trickling server
    chunked: bool = False  # no Content-Length: the body ends when the connection closes


def json_reply(obj, status: int = 200, **headers: str) -> Reply:
    return Reply(status, json.dumps(obj).encode(), {"Content-Type": "application/json",
                                                    **headers})


def page(n: int = 3, total: int | None = None, runs: list[dict] | None = None) -> Reply:
    """One page of ``runs`` (default: ``make_runs(n)``) claiming ``total`` (default: its size)."""
    runs = make_runs(n) if runs is None else runs
    total = len(runs) if total is None else total
    return json_reply({"items": runs, "total": total, "page": 1, "size": 100,
                       "pages": max(1, -(-total // 100))})


def redirect(location: str, status: int = 307) -> Reply:
    return Reply(status, b"", {"Location": location})


def self_signed(folder) -> tuple[Path, ssl.SSLContext]:
    """A certificate for 127.0.0.1 signed by nobody a client trusts: its PEM file (to trust it
    through ``api.ca_bundle``) and a server context that presents it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = Path(folder) / "cert.pem", Path(folder) / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_file, key_file)
    return cert_file, server


def bad_gzip() -> Reply:
    return Reply(200, b"this is not gzip at all", {"Content-Encoding": "gzip",
                                                   "Content-Type": "application/json"})


class FaultServer:
    def __init__(self, respond: Callable[[Request], Reply], *, tls: ssl.SSLContext | None = None):
        self.respond = respond
        self.requests: list[Request] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                req = Request(self.path, {k.lower(): v for k, v in self.headers.items()})
                server.requests.append(req)
                reply = server.respond(req)
                self.send_response(reply.status)
                for k, v in reply.headers.items():
                    self.send_header(k, v)
                if reply.chunked:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                try:
                    if reply.byte_delay:
                        for i in range(len(reply.body)):
                            if server.stopping.is_set():
                                return
                            self.wfile.write(reply.body[i:i + 1])
                            self.wfile.flush()
                            time.sleep(reply.byte_delay)
                    else:
                        self.wfile.write(reply.body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        # A client that hangs up mid-body (as it should on a huge or slow one) is no news: no
        # traceback on stderr, where the tests look for the product's.
        self._httpd.handle_error = lambda request, client_address: None  # type: ignore
        self.connections = 0  # connections accepted (with ``tls``: TLS handshakes attempted)
        accept = self._httpd.get_request

        def counted():
            self.connections += 1
            return accept()

        self._httpd.get_request = counted  # type: ignore[method-assign]
        if tls is not None:  # the handshake happens as each connection is accepted
            self._httpd.socket = tls.wrap_socket(self._httpd.socket, server_side=True)
        self.port = self._httpd.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
