"""Triton's own Python clients (tritonclient.grpc / tritonclient.http) against
a running Shamal stack that serves models/repository.

    SHAMAL_GRPC_URL=127.0.0.1:18001 SHAMAL_HTTP_URL=127.0.0.1:18000 \
        .deps/venv/bin/python -m pytest -q tests/compat/test_tritonclient.py

Both variables are required; without them every test fails with a message
saying so (nothing is skipped). SHAMAL_METRICS_URL (the stack's metrics
port) is required by the metrics test. SHAMAL_MODEL_REPOSITORY overrides the model
repository used for in-process onnxruntime reference runs (default
models/repository). SHAMAL_READY_TIMEOUT (seconds, default 60) bounds the
initial wait for the server and the models to become ready.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_REPOSITORY = Path(os.environ.get("SHAMAL_MODEL_REPOSITORY", REPO_ROOT / "models" / "repository"))
# Numpy references of the gpu-worker's demo models (models/generate_gpu.py).
GPU_REFERENCE = REPO_ROOT / "models" / "gpu" / "reference"
ALL_MODELS = ["demo", "demo_int8", "simple", "identity_fp16", "identity_bytes", "identity_bool_i8"]

GRPC_URL = os.environ.get("SHAMAL_GRPC_URL", "")
HTTP_URL = os.environ.get("SHAMAL_HTTP_URL", "")


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="session", autouse=True)
def _stack_ready():
    missing = [n for n, v in (("SHAMAL_GRPC_URL", GRPC_URL), ("SHAMAL_HTTP_URL", HTTP_URL)) if not v]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not set: start the Shamal stack serving models/repository and export "
            "SHAMAL_GRPC_URL (e.g. 127.0.0.1:18001) and SHAMAL_HTTP_URL (e.g. 127.0.0.1:18000)",
            pytrace=False,
        )
    timeout = float(os.environ.get("SHAMAL_READY_TIMEOUT", "60"))
    deadline = time.monotonic() + timeout
    g = grpcclient.InferenceServerClient(GRPC_URL)
    last = None
    while True:
        try:
            if g.is_server_ready() and all(g.is_model_ready(m) for m in ALL_MODELS):
                break
            last = "server or a model not ready: " + ", ".join(
                m for m in ALL_MODELS if not _safe_ready(g, m))
        except InferenceServerException as e:
            last = f"{e.status()}: {e.message()}"
        if time.monotonic() > deadline:
            pytest.fail(f"Shamal at gRPC {GRPC_URL} not ready after {timeout:.0f}s ({last})", pytrace=False)
        time.sleep(0.25)
    g.close()


def _safe_ready(client, model):
    try:
        return client.is_model_ready(model)
    except InferenceServerException:
        return False


@pytest.fixture(scope="module")
def grpc_client():
    c = grpcclient.InferenceServerClient(GRPC_URL)
    yield c
    c.close()


@pytest.fixture(scope="module")
def http_client():
    c = httpclient.InferenceServerClient(HTTP_URL)
    yield c
    c.close()


@pytest.fixture(scope="module")
def demo_reference():
    """Runs demo/1/model.onnx in-process with onnxruntime."""
    import onnxruntime as ort

    path = MODEL_REPOSITORY / "demo" / "1" / "model.onnx"
    assert path.is_file(), f"{path} missing (run .deps/venv/bin/python models/generate.py)"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: sess.run(["OUTPUT0"], {"INPUT0": x})[0]


def _grpc_input(name, array, datatype):
    i = grpcclient.InferInput(name, list(array.shape), datatype)
    i.set_data_from_numpy(array)
    return i


def _http_input(name, array, datatype, binary=True):
    i = httpclient.InferInput(name, list(array.shape), datatype)
    i.set_data_from_numpy(array, binary_data=binary)
    return i


def _simple_data(batch, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.integers(-1000, 1000, size=(batch, 16), dtype=np.int32)
    b = rng.integers(-1000, 1000, size=(batch, 16), dtype=np.int32)
    return a, b


def _demo_data(batch, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, 16)).astype(np.float32)


# ------------------------------------------------------- health / metadata

def test_health_grpc(grpc_client):
    assert grpc_client.is_server_live()
    assert grpc_client.is_server_ready()
    for m in ALL_MODELS:
        assert grpc_client.is_model_ready(m), m
    assert grpc_client.is_model_ready("simple", "1")
    assert grpc_client.is_model_ready("simple", "2")


def test_health_http(http_client):
    assert http_client.is_server_live()
    assert http_client.is_server_ready()
    for m in ALL_MODELS:
        assert http_client.is_model_ready(m), m
    assert http_client.is_model_ready("simple", "2")
    assert not http_client.is_model_ready("no_such_model")


def test_server_metadata(grpc_client, http_client):
    g = grpc_client.get_server_metadata()
    assert g.name
    assert g.version
    h = http_client.get_server_metadata()
    assert h["name"]
    assert h["name"] == g.name


def test_model_metadata_grpc(grpc_client):
    md = grpc_client.get_model_metadata("demo")
    assert md.name == "demo"
    assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [("INPUT0", "FP32", [-1, 16])]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.outputs] == [("OUTPUT0", "FP32", [-1, 4])]


def test_model_metadata_http(http_client):
    md = http_client.get_model_metadata("demo")
    assert md["name"] == "demo"
    assert [(t["name"], t["datatype"], t["shape"]) for t in md["inputs"]] == [("INPUT0", "FP32", [-1, 16])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in md["outputs"]] == [("OUTPUT0", "FP32", [-1, 4])]


def test_model_metadata_simple_versions(grpc_client):
    md = grpc_client.get_model_metadata("simple")
    assert sorted(md.versions) == ["1", "2"]
    assert sorted((t.name, t.datatype, tuple(t.shape)) for t in md.inputs) == [
        ("INPUT0", "INT32", (-1, 16)), ("INPUT1", "INT32", (-1, 16))]
    md = grpc_client.get_model_metadata("identity_bytes")
    assert [(t.name, t.datatype) for t in md.inputs] == [("INPUT0", "BYTES")]


def test_model_config_demo_grpc(grpc_client):
    cfg = grpc_client.get_model_config("demo").config
    assert cfg.name == "demo"
    assert cfg.max_batch_size == 64
    assert cfg.HasField("dynamic_batching")
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 0
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("INPUT0", mc.TYPE_FP32, [16])]
    assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [("OUTPUT0", mc.TYPE_FP32, [4])]


def test_model_config_simple_derived_grpc(grpc_client):
    cfg = grpc_client.get_model_config("simple").config
    assert cfg.max_batch_size > 0
    inputs = sorted((i.name, i.data_type, list(i.dims)) for i in cfg.input)
    assert inputs == [("INPUT0", mc.TYPE_INT32, [16]), ("INPUT1", mc.TYPE_INT32, [16])]
    outputs = sorted((o.name, o.data_type, list(o.dims)) for o in cfg.output)
    assert outputs == [("OUTPUT0", mc.TYPE_INT32, [16]), ("OUTPUT1", mc.TYPE_INT32, [16])]


def test_model_config_autocompleted_io_grpc(grpc_client):
    # demo_int8's config.pbtxt has no input/output: they come from the graph.
    cfg = grpc_client.get_model_config("demo_int8").config
    assert cfg.max_batch_size == 64
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [("INPUT0", mc.TYPE_FP32, [16])]
    assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [("OUTPUT0", mc.TYPE_FP32, [4])]


def test_model_config_http(http_client):
    cfg = http_client.get_model_config("demo")
    assert cfg["max_batch_size"] == 64
    assert "dynamic_batching" in cfg
    cfg = http_client.get_model_config("simple")
    assert cfg["max_batch_size"] > 0


def test_repository_index(grpc_client, http_client):
    g = {m.name for m in grpc_client.get_model_repository_index().models}
    assert {"demo", "simple"} <= g, g
    h = {m["name"] for m in http_client.get_model_repository_index()}
    assert {"demo", "simple"} <= h, h


# ------------------------------------------------------------- inference

# `simple` has two versions: v1 OUTPUT0 = a+b, v2 OUTPUT0 = a+b+1 (OUTPUT1 = a-b
# in both). As in Triton, a request without model_version goes to the highest
# version, so the add/sub checks below name version 1 explicitly.

@pytest.mark.parametrize("batch", [1, 3])
def test_simple_grpc(grpc_client, batch):
    a, b = _simple_data(batch, seed=batch)
    res = grpc_client.infer(
        "simple", [_grpc_input("INPUT0", a, "INT32"), _grpc_input("INPUT1", b, "INT32")], model_version="1")
    o0, o1 = res.as_numpy("OUTPUT0"), res.as_numpy("OUTPUT1")
    assert o0.dtype == np.int32 and o0.shape == (batch, 16)
    np.testing.assert_array_equal(o0, a + b)
    np.testing.assert_array_equal(o1, a - b)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("in_binary,out_binary", list(itertools.product([True, False], repeat=2)))
def test_simple_http(http_client, batch, in_binary, out_binary):
    a, b = _simple_data(batch, seed=10 + batch)
    res = http_client.infer(
        "simple",
        [_http_input("INPUT0", a, "INT32", in_binary), _http_input("INPUT1", b, "INT32", in_binary)],
        outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=out_binary),
                 httpclient.InferRequestedOutput("OUTPUT1", binary_data=out_binary)],
        model_version="1",
    )
    o0, o1 = res.as_numpy("OUTPUT0"), res.as_numpy("OUTPUT1")
    assert o0.shape == (batch, 16)
    np.testing.assert_array_equal(o0, a + b)
    np.testing.assert_array_equal(o1, a - b)


def test_simple_version2_grpc(grpc_client):
    a, b = _simple_data(2, seed=3)
    inputs = [_grpc_input("INPUT0", a, "INT32"), _grpc_input("INPUT1", b, "INT32")]
    res = grpc_client.infer("simple", inputs, model_version="2")
    np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), a + b + 1)
    np.testing.assert_array_equal(res.as_numpy("OUTPUT1"), a - b)
    assert res.get_response().model_version == "2"
    res = grpc_client.infer("simple", inputs, model_version="1")
    np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), a + b)
    assert res.get_response().model_version == "1"


def test_simple_default_version_is_highest(grpc_client, http_client):
    a, b = _simple_data(2, seed=7)
    res = grpc_client.infer("simple", [_grpc_input("INPUT0", a, "INT32"), _grpc_input("INPUT1", b, "INT32")])
    np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), a + b + 1)
    res = http_client.infer("simple", [_http_input("INPUT0", a, "INT32"), _http_input("INPUT1", b, "INT32")])
    np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), a + b + 1)


def test_simple_version2_http(http_client):
    a, b = _simple_data(2, seed=4)
    res = http_client.infer(
        "simple", [_http_input("INPUT0", a, "INT32"), _http_input("INPUT1", b, "INT32")], model_version="2")
    np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), a + b + 1)
    assert res.get_response()["model_version"] == "2"


def test_simple_requested_output_only_grpc(grpc_client):
    a, b = _simple_data(2, seed=5)
    res = grpc_client.infer(
        "simple", [_grpc_input("INPUT0", a, "INT32"), _grpc_input("INPUT1", b, "INT32")],
        outputs=[grpcclient.InferRequestedOutput("OUTPUT1")], model_version="1")
    assert [o.name for o in res.get_response().outputs] == ["OUTPUT1"]
    assert res.as_numpy("OUTPUT0") is None
    np.testing.assert_array_equal(res.as_numpy("OUTPUT1"), a - b)


def test_simple_requested_output_only_http(http_client):
    a, b = _simple_data(2, seed=6)
    res = http_client.infer(
        "simple", [_http_input("INPUT0", a, "INT32"), _http_input("INPUT1", b, "INT32")],
        outputs=[httpclient.InferRequestedOutput("OUTPUT1", binary_data=False)], model_version="1")
    assert [o["name"] for o in res.get_response()["outputs"]] == ["OUTPUT1"]
    np.testing.assert_array_equal(res.as_numpy("OUTPUT1"), a - b)


@pytest.mark.parametrize("batch", [1, 4])
def test_demo_matches_onnxruntime_grpc(grpc_client, demo_reference, batch):
    x = _demo_data(batch, seed=20 + batch)
    y = grpc_client.infer("demo", [_grpc_input("INPUT0", x, "FP32")]).as_numpy("OUTPUT0")
    assert y.dtype == np.float32 and y.shape == (batch, 4)
    np.testing.assert_allclose(y.sum(axis=1), np.ones(batch), atol=1e-5)
    np.testing.assert_allclose(y, demo_reference(x), atol=1e-5)


@pytest.mark.parametrize("binary", [True, False])
def test_demo_matches_onnxruntime_http(http_client, demo_reference, binary):
    x = _demo_data(3, seed=30)
    res = http_client.infer(
        "demo", [_http_input("INPUT0", x, "FP32", binary)],
        outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)])
    y = res.as_numpy("OUTPUT0")
    np.testing.assert_allclose(y.sum(axis=1), np.ones(3), atol=1e-5)
    np.testing.assert_allclose(y, demo_reference(x), atol=1e-5)


def test_demo_int8_close_to_demo(grpc_client):
    x = _demo_data(8, seed=40)
    inp = [_grpc_input("INPUT0", x, "FP32")]
    fp32 = grpc_client.infer("demo", inp).as_numpy("OUTPUT0")
    int8 = grpc_client.infer("demo_int8", inp).as_numpy("OUTPUT0")
    assert int8.shape == (8, 4)
    np.testing.assert_allclose(int8.sum(axis=1), np.ones(8), atol=1e-5)
    np.testing.assert_allclose(int8, fp32, atol=0.05)


@pytest.mark.parametrize("shape", [(2, 5), (1, 3)])
def test_identity_fp16(grpc_client, http_client, shape):
    x = np.random.default_rng(50).standard_normal(shape).astype(np.float16)
    y = grpc_client.infer("identity_fp16", [_grpc_input("INPUT0", x, "FP16")]).as_numpy("OUTPUT0")
    assert y.dtype == np.float16 and y.shape == shape
    np.testing.assert_array_equal(y, x)
    y = http_client.infer("identity_fp16", [_http_input("INPUT0", x, "FP16")]).as_numpy("OUTPUT0")
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y, x)


BYTES_DATA = np.array([[b"hello"], [b""], ["\u00fcn\u00ef c\u00f4d\u00e9".encode()], [b"x" * 300]], dtype=np.object_)


def test_identity_bytes_grpc(grpc_client):
    y = grpc_client.infer("identity_bytes", [_grpc_input("INPUT0", BYTES_DATA, "BYTES")]).as_numpy("OUTPUT0")
    assert y.shape == BYTES_DATA.shape
    assert y.ravel().tolist() == BYTES_DATA.ravel().tolist()


@pytest.mark.parametrize("binary", [True, False])
def test_identity_bytes_http(http_client, binary):
    res = http_client.infer(
        "identity_bytes", [_http_input("INPUT0", BYTES_DATA, "BYTES", binary)],
        outputs=[httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)])
    y = res.as_numpy("OUTPUT0")
    assert y.shape == BYTES_DATA.shape
    got = [v if isinstance(v, bytes) else str(v).encode() for v in y.ravel()]
    assert got == BYTES_DATA.ravel().tolist()


def test_identity_bool_i8(grpc_client, http_client):
    b = np.array([[True, False, True, False], [False, False, True, True]])
    i8 = np.array([[-128, -1, 0, 127], [1, 2, 3, 4]], dtype=np.int8)
    res = grpc_client.infer("identity_bool_i8", [_grpc_input("INPUT0", b, "BOOL"), _grpc_input("INPUT1", i8, "INT8")])
    assert res.as_numpy("OUTPUT0").dtype == np.bool_
    np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), b)
    assert res.as_numpy("OUTPUT1").dtype == np.int8
    np.testing.assert_array_equal(res.as_numpy("OUTPUT1"), i8)
    res = http_client.infer("identity_bool_i8", [_http_input("INPUT0", b, "BOOL"), _http_input("INPUT1", i8, "INT8")])
    np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), b)
    np.testing.assert_array_equal(res.as_numpy("OUTPUT1"), i8)


# ---------------------------------------------------------------- errors

def _grpc_error(fn):
    with pytest.raises(InferenceServerException) as ei:
        fn()
    return ei.value


def test_unknown_model_grpc(grpc_client):
    x = _demo_data(1)
    e = _grpc_error(lambda: grpc_client.infer("no_such_model", [_grpc_input("INPUT0", x, "FP32")]))
    assert e.status() == "StatusCode.NOT_FOUND", (e.status(), e.message())
    e = _grpc_error(lambda: grpc_client.get_model_metadata("no_such_model"))
    assert e.status() == "StatusCode.NOT_FOUND", (e.status(), e.message())


def test_unknown_model_http(http_client):
    x = _demo_data(1)
    e = _grpc_error(lambda: http_client.infer("no_such_model", [_http_input("INPUT0", x, "FP32")]))
    assert 400 <= int(e.status()) < 500, (e.status(), e.message())
    e = _grpc_error(lambda: http_client.get_model_metadata("no_such_model"))
    assert 400 <= int(e.status()) < 500, (e.status(), e.message())


def test_unknown_version_grpc(grpc_client):
    a, b = _simple_data(1)
    e = _grpc_error(lambda: grpc_client.infer(
        "simple", [_grpc_input("INPUT0", a, "INT32"), _grpc_input("INPUT1", b, "INT32")], model_version="9"))
    assert e.status() in ("StatusCode.NOT_FOUND", "StatusCode.INVALID_ARGUMENT"), (e.status(), e.message())


def test_wrong_shape_grpc(grpc_client):
    x = np.zeros((1, 8), dtype=np.float32)
    e = _grpc_error(lambda: grpc_client.infer("demo", [_grpc_input("INPUT0", x, "FP32")]))
    assert e.status() == "StatusCode.INVALID_ARGUMENT", (e.status(), e.message())
    assert "INPUT0" in e.message()


def test_wrong_datatype_grpc(grpc_client):
    x = np.zeros((1, 16), dtype=np.int32)
    e = _grpc_error(lambda: grpc_client.infer("demo", [_grpc_input("INPUT0", x, "INT32")]))
    assert e.status() == "StatusCode.INVALID_ARGUMENT", (e.status(), e.message())
    assert "INPUT0" in e.message()


def test_missing_input_grpc(grpc_client):
    a, _ = _simple_data(1)
    e = _grpc_error(lambda: grpc_client.infer("simple", [_grpc_input("INPUT0", a, "INT32")]))
    assert e.status() == "StatusCode.INVALID_ARGUMENT", (e.status(), e.message())
    assert "INPUT1" in e.message()


def test_batch_too_large_grpc(grpc_client):
    x = _demo_data(65)  # demo's max_batch_size is 64
    e = _grpc_error(lambda: grpc_client.infer("demo", [_grpc_input("INPUT0", x, "FP32")]))
    assert e.status() == "StatusCode.INVALID_ARGUMENT", (e.status(), e.message())


@pytest.mark.parametrize("case", ["shape", "datatype", "missing"])
def test_invalid_request_http(http_client, case):
    if case == "shape":
        model, inputs, named = "demo", [_http_input("INPUT0", np.zeros((1, 8), np.float32), "FP32")], "INPUT0"
    elif case == "datatype":
        model, inputs, named = "demo", [_http_input("INPUT0", np.zeros((1, 16), np.int32), "INT32")], "INPUT0"
    else:
        a, _ = _simple_data(1)
        model, inputs, named = "simple", [_http_input("INPUT0", a, "INT32")], "INPUT1"
    e = _grpc_error(lambda: http_client.infer(model, inputs))
    assert int(e.status()) == 400, (e.status(), e.message())
    assert named in e.message()


# ------------------------------------------------------------ statistics

def test_inference_statistics(grpc_client, http_client):
    before = grpc_client.get_inference_statistics("demo").model_stats
    before_count = sum(s.inference_count for s in before)
    x = _demo_data(2, seed=60)
    for _ in range(3):
        grpc_client.infer("demo", [_grpc_input("INPUT0", x, "FP32")])
    stats = grpc_client.get_inference_statistics("demo").model_stats
    assert stats and all(s.name == "demo" for s in stats)
    count = sum(s.inference_count for s in stats)
    assert count > 0
    assert count >= before_count + 6, (before_count, count)
    assert sum(s.inference_stats.success.count for s in stats) >= 3
    h = http_client.get_inference_statistics("demo")
    assert sum(s["inference_count"] for s in h["model_stats"]) >= count


# ------------------------------------------- gpu-worker (candle) via router
# `shamal up` also runs a gpu-worker serving models/gpu/repository; the
# router sends these requests to it like to any worker.

def _wait_gpu_model(client, model):
    deadline = time.monotonic() + float(os.environ.get("SHAMAL_READY_TIMEOUT", "60"))
    while not _safe_ready(client, model):
        if time.monotonic() > deadline:
            pytest.fail(f"{model} (gpu-worker) not ready through the router", pytrace=False)
        time.sleep(0.25)


@pytest.fixture(scope="module")
def text_reference():
    return json.loads((GPU_REFERENCE / "minilm_tiny_text.json").read_text())


def test_text_encoder_grpc(grpc_client, text_reference):
    _wait_gpu_model(grpc_client, "minilm_tiny_text")
    md = grpc_client.get_model_metadata("minilm_tiny_text")
    assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [("text", "BYTES", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.outputs] == [("embedding", "FP32", [-1, 32])]
    sentences = np.array(text_reference["text"], dtype=object)
    result = grpc_client.infer("minilm_tiny_text", [_grpc_input("text", sentences, "BYTES")])
    embeddings = result.as_numpy("embedding")
    assert embeddings.dtype == np.float32
    assert embeddings.shape == (len(sentences), 32)
    np.testing.assert_allclose(np.linalg.norm(embeddings.astype(np.float64), axis=1), 1.0, atol=1e-5)
    tolerance = text_reference["tolerance"]
    np.testing.assert_allclose(embeddings, np.array(text_reference["embedding"]),
                               atol=tolerance["abs"], rtol=tolerance["rel"])


@pytest.mark.parametrize("binary", [True, False])
def test_text_encoder_http(http_client, grpc_client, text_reference, binary):
    _wait_gpu_model(grpc_client, "minilm_tiny_text")
    sentences = np.array(["The quick brown fox jumps over the lazy dog.", "Hello, world!"], dtype=object)
    result = http_client.infer("minilm_tiny_text", [_http_input("text", sentences, "BYTES", binary)])
    embeddings = result.as_numpy("embedding")
    assert embeddings.shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(embeddings.astype(np.float64), axis=1), 1.0, atol=1e-5)
    expected = dict(zip(text_reference["text"], text_reference["embedding"]))
    for sentence, row in zip(sentences, embeddings):
        np.testing.assert_allclose(row, expected[sentence], atol=1e-5, rtol=1e-4)


def test_text_encoder_rejects_empty_text(grpc_client):
    _wait_gpu_model(grpc_client, "minilm_tiny_text")
    with pytest.raises(InferenceServerException) as error:
        grpc_client.infer("minilm_tiny_text",
                          [_grpc_input("text", np.array(["   "], dtype=object), "BYTES")])
    assert "INVALID_ARGUMENT" in str(error.value.status()), error.value
    assert "text" in error.value.message()


# ----------------------------------------------------------------- metrics
# Both workers of `shamal up` register their metrics in one process
# registry; each must reach /metrics under its own backend label (a second
# registration used to be ignored, so one worker's metrics never showed).

METRICS_URL = os.environ.get("SHAMAL_METRICS_URL", "")


def _worker_requests(text, backend, model):
    prefix = "shamal_worker_requests_total{"
    total = 0.0
    for line in text.splitlines():
        if line.startswith(prefix) and f'backend="{backend}"' in line and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_both_workers_metrics_reach_the_metrics_endpoint(grpc_client, text_reference):
    if not METRICS_URL:
        pytest.fail("SHAMAL_METRICS_URL not set (e.g. 127.0.0.1:18002)", pytrace=False)
    import urllib.request
    _wait_gpu_model(grpc_client, "minilm_tiny_text")
    grpc_client.infer("demo", [_grpc_input("INPUT0", _demo_data(1, seed=61), "FP32")])
    sentences = np.array(text_reference["text"], dtype=object)
    grpc_client.infer("minilm_tiny_text", [_grpc_input("text", sentences, "BYTES")])
    with urllib.request.urlopen(f"http://{METRICS_URL}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert _worker_requests(text, "onnxruntime", "demo") >= 1, "cpu-worker metrics missing"
    assert _worker_requests(text, "candle", "minilm_tiny_text") >= 1, "gpu-worker metrics missing"
