"""What unit and end-to-end tests share."""
from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@contextmanager
def _serve(answer, tls: tuple | None = None):
    """A local endpoint; ``answer(n, body)`` returns (status, payload) for the n-th request
    (0-based). ``tls`` (certificate file, key file): served over https."""
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
    if tls is not None:
        import ssl
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        scheme = "https" if tls is not None else "http"
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}/score", calls
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


# ---- reading back what the experiment trackers recorded ----------------------------------------
def _wandb_records(path):
    """The protobuf Records of a W&B run file (``run-<id>.wandb``): a 7-byte header (":W&B",
    magic, version), then LevelDB-style log blocks of 32 KiB whose chunks carry a 7-byte
    header (crc32, little-endian length, type: 1 whole, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@pytest.fixture
def wandb_run():
    """``wandb_run(run_dir)``: {run id: {"history": [{key: value}], "summary": {key: value},
    "config": {key: value}}} of the W&B offline runs under ``run_dir/wandb``."""
    def read(run_dir):
        runs = {}
        for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
            run = runs.setdefault(path.stem[len("run-"):],
                                  {"history": [], "summary": {}, "config": {}})
            for rec in _wandb_records(path):
                kind = rec.WhichOneof("record_type")
                if kind == "history":
                    run["history"].append({i.key or "/".join(i.nested_key):
                                           json.loads(i.value_json) for i in rec.history.item})
                elif kind == "summary":
                    run["summary"].update({i.key or "/".join(i.nested_key):
                                           json.loads(i.value_json) for i in rec.summary.update})
                elif kind in ("config", "run"):
                    updates = rec.config.update if kind == "config" else rec.run.config.update
                    run["config"].update({i.key: json.loads(i.value_json) for i in updates})
        return runs
    return read


@pytest.fixture
def mlflow_run():
    """``mlflow_run(uri, run_id)``: the MLflow run's status, params, and each metric's
    [(step, value)] history."""
    def read(uri, run_id):
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri=uri)
        run = client.get_run(run_id)
        history = {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
                   for key in run.data.metrics}
        return {"status": run.info.status, "params": run.data.params, "metrics": history,
                "client": client}
    return read


# ---- a model whose code ships with the checkpoint ------------------------------------------------
CUSTOM_CONFIG = '''from transformers import LlamaConfig


class ShippedConfig(LlamaConfig):
    model_type = "rayalign_shipped"
'''
CUSTOM_MODELING = '''from torch import nn
from transformers import LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel
from transformers import LlamaForSequenceClassification, LlamaForTokenClassification

from .configuration_shipped import ShippedConfig


class ShippedModel(LlamaModel):
    config_class = ShippedConfig


class ShippedForCausalLM(LlamaForCausalLM):
    config_class = ShippedConfig


class ShippedForSequenceClassification(LlamaForSequenceClassification):
    config_class = ShippedConfig

    def __init__(self, config):
        LlamaPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = ShippedModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()


class ShippedForTokenClassification(LlamaForTokenClassification):
    config_class = ShippedConfig

    def __init__(self, config):
        LlamaPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = ShippedModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout or 0.0)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()
'''


def shipped_code_model(out_dir):
    """A tiny Llama re-labelled as family ``rayalign_shipped``, which transformers knows only
    from the code beside the weights (config.json ``auto_map``), as checkpoints with their own
    modelling code come."""
    from orchestrator.tiny_model import build_model
    out = build_model(out_dir, "tiny", seed=0)
    (out / "configuration_shipped.py").write_text(CUSTOM_CONFIG)
    (out / "modeling_shipped.py").write_text(CUSTOM_MODELING)
    config = json.loads((out / "config.json").read_text())
    config.update(model_type="rayalign_shipped", architectures=["ShippedForCausalLM"], auto_map={
        "AutoConfig": "configuration_shipped.ShippedConfig",
        "AutoModelForCausalLM": "modeling_shipped.ShippedForCausalLM",
        "AutoModelForSequenceClassification": "modeling_shipped.ShippedForSequenceClassification",
        "AutoModelForTokenClassification": "modeling_shipped.ShippedForTokenClassification"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="session")
def shipped_model(tmp_path_factory):
    return shipped_code_model(tmp_path_factory.mktemp("shipped") / "model")
