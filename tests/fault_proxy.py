"""A fault-injecting HTTP proxy on 127.0.0.1, in front of the local S3 server (a test utility).

Every request is forwarded to `upstream` unless a fault is drawn for it: an HTTP 500 or 503 with
an S3-style error body, a connection reset (the socket is closed without an answer), or a delay.
`failure_rate` = 1.0 is a store that is down for good. Faults are counted by kind, so a test can
check that they really happened.
"""
from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


class FaultProxy:
    """`with FaultProxy(upstream, failure_rate=0.1) as proxy:` -> proxy.url is the endpoint to use."""

    def __init__(self, upstream: str, *, failure_rate: float = 0.1, delay_s: float = 0.2,
                 kinds: tuple[str, ...] = ("500", "503", "reset", "delay"), seed: int = 0):
        parsed = urlparse(upstream)
        if parsed.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError("the fault proxy only fronts a server on loopback")
        self.upstream = (parsed.hostname, parsed.port)
        self.failure_rate, self.delay_s, self.kinds = failure_rate, delay_s, kinds
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"forwarded": 0, **{k: 0 for k in kinds}}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def draw(self) -> str | None:
        with self.lock:
            kind = self.rng.choice(self.kinds) if self.rng.random() < self.failure_rate else None
            self.counts[kind or "forwarded"] += 1
            return kind

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

            def _fail(self, status: int) -> None:
                body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>"
                        f"{'InternalError' if status == 500 else 'SlowDown'}</Code><Message>injected fault"
                        f"</Message></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":  # a body after a HEAD answer would corrupt the connection
                    self.wfile.write(body)

            def _forward(self) -> None:
                body = self._body()
                kind = proxy.draw()
                if kind == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.close_connection = True
                    self.connection.close()
                    return
                if kind in ("500", "503"):
                    self._fail(int(kind))
                    return
                if kind == "delay":
                    time.sleep(proxy.delay_s)
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
                headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in _HOP_HEADERS and key.lower() != "content-length":
                        self.send_header(key, value)
                # A HEAD answer has no body, but its Content-Length is the object's size: keep the
                # upstream's (a client reads the size of an object from it).
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
