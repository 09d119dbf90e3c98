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


# ---- ending the test process ------------------------------------------------------------------
# A whole-suite run imports native extensions into this one process (triton's nanobind bindings
# through transformers, Ray's core worker). After every result is in and reported, their
# destructors at interpreter shutdown have crashed the process now and then (a segmentation
# fault after "N passed", turning a green run red). Once pytest is done, the process ends here
# with pytest's own exit status, after shutting down Ray, instead of in those destructors.
_status: dict = {}


def pytest_sessionfinish(session, exitstatus):
    _status["code"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if "code" not in _status:
        return
    import os
    import sys
    try:
        import ray
        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001  (the results are in; only the exit status matters now)
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_status["code"])
