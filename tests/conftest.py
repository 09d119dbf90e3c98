"""What unit and end-to-end tests share."""
from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@contextmanager
def _serve(answer):
    """A local endpoint; ``answer(n, body)`` returns (status, payload) for the n-th request (0-based)."""
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            calls.append(body)
            status, payload = answer(len(calls) - 1, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.handle_error = lambda *_: None  # a client that timed out: its broken pipe is expected
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/score", calls
    finally:
        server.shutdown()
        server.server_close()



@pytest.fixture
def serve():
    """``with serve(answer) as (url, calls)``: a local reward endpoint for the test (see
    :func:`_serve`)."""
    return _serve
