"""The Spark helper (python/shamal_spark) on a local Spark session against a
running Shamal stack that serves models/repository.

    SHAMAL_GRPC_URL=127.0.0.1:18001 .deps/venv/bin/python -m pytest -q tests/spark

SHAMAL_GRPC_URL is required; without it every test that needs the stack
fails with a message saying so (nothing is skipped). SHAMAL_READY_TIMEOUT
(seconds, default 60) bounds the initial wait for the models. Needs pyspark,
pandas and pyarrow (scripts/setup-deps.sh) and a Java 17 runtime on PATH
(scripts/test.sh installs Debian's openjdk-17-jre-headless when `java` is
absent). The Spark session is local[2], with no UI and nothing downloaded.

Every score is compared with the same model called directly with
tritonclient on the same rows. The bearer token, tenant and region headers,
the token file's rotation and the retries on RESOURCE_EXHAUSTED are checked
against a small in-process gRPC server that records what it receives
(`shamal up` runs with auth off, so it cannot tell whether a token came).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
HELPER = REPO_ROOT / "python" / "shamal_spark"
sys.path.insert(0, str(HELPER))

import grpc  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from shamal_spark import SchemaError, ShamalError, predict_udf, score  # noqa: E402

GRPC_URL = os.environ.get("SHAMAL_GRPC_URL", "")
MODELS = ["demo", "simple", "identity_bytes"]
ROWS = 3000


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def stack():
    if not GRPC_URL:
        pytest.fail("SHAMAL_GRPC_URL not set: start the Shamal stack serving models/repository and export "
                    "SHAMAL_GRPC_URL (e.g. 127.0.0.1:18001)", pytrace=False)
    timeout = float(os.environ.get("SHAMAL_READY_TIMEOUT", "60"))
    deadline = time.monotonic() + timeout
    client = grpcclient.InferenceServerClient(GRPC_URL)
    last = None
    while True:
        try:
            if client.is_server_ready() and all(client.is_model_ready(m) for m in MODELS):
                break
            last = "server or a model not ready"
        except InferenceServerException as e:
            last = f"{e.status()}: {e.message()}"
        if time.monotonic() > deadline:
            pytest.fail(f"Shamal at gRPC {GRPC_URL} not ready after {timeout:.0f}s ({last})", pytrace=False)
        time.sleep(0.25)
    yield client
    client.close()


@pytest.fixture(scope="session")
def spark():
    # Executors' Python workers: this interpreter (the venv's), able to
    # import shamal_spark from the source tree.
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HELPER), os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("shamal-spark-test")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def _direct(client, model, inputs, output_names, batch, version=""):
    """The model called directly with tritonclient, `batch` rows a call:
    {output name: array of all rows}."""
    n = len(next(iter(inputs.values()))[1])
    parts = {name: [] for name in output_names}
    for start in range(0, n, batch):
        tensors = []
        for name, (datatype, array) in inputs.items():
            chunk = array[start:start + batch]
            t = grpcclient.InferInput(name, list(chunk.shape), datatype)
            t.set_data_from_numpy(chunk)
            tensors.append(t)
        result = client.infer(model, tensors, model_version=version)
        for name in output_names:
            parts[name].append(result.as_numpy(name))
    return {name: np.concatenate(p) for name, p in parts.items()}


def _demo_frame(spark, rows=ROWS, partitions=3, seed=0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 16)).astype(np.float32)
    pdf = pd.DataFrame({
        "id": np.arange(rows, dtype=np.int64),
        "tag": [f"row-{i}" for i in range(rows)],
        "features": list(x),
        "amount": rng.standard_normal(rows),
        "label": [f"t{i}" for i in range(rows)],
    })
    # Shuffled across partitions, so row order differs from id order.
    return spark.createDataFrame(pdf).repartition(partitions), x


def _by_id(df):
    pdf = df.toPandas()
    return pdf.sort_values("id").reset_index(drop=True)


def _no_job_ran(spark, group, fn):
    """Runs fn (expected to raise) under a job group; asserts no Spark job
    started, i.e. the error came before the job."""
    sc = spark.sparkContext
    sc.setJobGroup(group, group)
    try:
        fn()
    finally:
        jobs = sc.statusTracker().getJobIdsForGroup(group)
        sc.setJobGroup("", "")
    assert list(jobs) == [], f"a Spark job ran before the error: {list(jobs)}"


# -------------------------------------------------- scores against the stack

def test_score_demo_matches_direct_calls(stack, spark):
    from pyspark.sql import types as T

    df, x = _demo_frame(spark)
    scored = score(df, "demo", {"INPUT0": "features"}, url=GRPC_URL, keys=["id", "tag"])
    assert [f.name for f in scored.schema.fields] == ["id", "tag", "OUTPUT0"]
    assert scored.schema["OUTPUT0"].dataType == T.ArrayType(T.FloatType(), False)
    assert scored.schema["id"].dataType == T.LongType()
    out = _by_id(scored)
    assert out["id"].tolist() == list(range(ROWS))
    # Key columns stay with their rows.
    assert out["tag"].tolist() == [f"row-{i}" for i in out["id"]]
    got = np.stack(out["OUTPUT0"].to_numpy())
    assert got.dtype == np.float32 and got.shape == (ROWS, 4)
    want = _direct(stack, "demo", {"INPUT0": ("FP32", x)}, ["OUTPUT0"], batch=64)["OUTPUT0"]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_score_two_inputs_version_and_renamed_outputs(stack, spark):
    import pandas as pd

    rows = 800
    rng = np.random.default_rng(1)
    a = rng.integers(-1000, 1000, size=(rows, 16), dtype=np.int32)
    b = rng.integers(-1000, 1000, size=(rows, 16), dtype=np.int32)
    pdf = pd.DataFrame({"key": np.arange(rows) * 7, "a": list(a), "b": list(b)})
    df = spark.createDataFrame(pdf).repartition(2)
    for version in ("1", "2"):
        scored = score(df, "simple", ["a", "b"], {"OUTPUT0": "sum", "OUTPUT1": "diff"}, url=GRPC_URL,
                       version=version, keys=["key"], batch_size=100)
        out = scored.toPandas().sort_values("key").reset_index(drop=True)
        assert out["key"].tolist() == [i * 7 for i in range(rows)]
        want = _direct(stack, "simple", {"INPUT0": ("INT32", a), "INPUT1": ("INT32", b)}, ["OUTPUT0", "OUTPUT1"],
                       batch=32, version=version)
        np.testing.assert_array_equal(np.stack(out["sum"].to_numpy()), want["OUTPUT0"])
        np.testing.assert_array_equal(np.stack(out["diff"].to_numpy()), want["OUTPUT1"])
    # The versions really differ (simple/2 adds one), so `version` was sent.
    v1 = _direct(stack, "simple", {"INPUT0": ("INT32", a), "INPUT1": ("INT32", b)}, ["OUTPUT0"], 32, "1")
    v2 = _direct(stack, "simple", {"INPUT0": ("INT32", a), "INPUT1": ("INT32", b)}, ["OUTPUT0"], 32, "2")
    assert not np.array_equal(v1["OUTPUT0"], v2["OUTPUT0"])


def test_score_text_column_bytes_model(stack, spark):
    import pandas as pd
    from pyspark.sql import types as T

    texts = ["hello", "", "ün ïcôdé", "x" * 300] * 100
    pdf = pd.DataFrame({"id": np.arange(len(texts)), "text": texts})
    df = spark.createDataFrame(pdf).repartition(2)
    scored = score(df, "identity_bytes", "text", url=GRPC_URL, keys=["id"], batch_size=50)
    assert scored.schema["OUTPUT0"].dataType == T.StringType()
    out = _by_id(scored)
    encoded = np.array([[t.encode()] for t in texts], dtype=np.object_)
    want = _direct(stack, "identity_bytes", {"INPUT0": ("BYTES", encoded)}, ["OUTPUT0"], batch=32)["OUTPUT0"]
    assert out["OUTPUT0"].tolist() == [v.decode() for v in want.ravel()]


def test_predict_udf_matches_direct_calls(stack, spark):
    df, x = _demo_frame(spark, rows=1000, partitions=2, seed=5)
    udf = predict_udf("demo", url=GRPC_URL, batch_size=32)
    out = _by_id(df.withColumn("probs", udf("features")).select("id", "tag", "probs"))
    assert out["tag"].tolist() == [f"row-{i}" for i in out["id"]]
    want = _direct(stack, "demo", {"INPUT0": ("FP32", x)}, ["OUTPUT0"], batch=64)["OUTPUT0"]
    np.testing.assert_allclose(np.stack(out["probs"].to_numpy()), want, rtol=1e-6, atol=1e-7)


def test_residency_regions_are_sent(stack, spark):
    df, x = _demo_frame(spark, rows=200, partitions=1, seed=9)
    # `shamal up`'s workers are in region "local".
    out = _by_id(score(df, "demo", "features", url=GRPC_URL, keys=["id"], regions=["local"], tenant="acme"))
    want = _direct(stack, "demo", {"INPUT0": ("FP32", x)}, ["OUTPUT0"], batch=64)["OUTPUT0"]
    np.testing.assert_allclose(np.stack(out["OUTPUT0"].to_numpy()), want, rtol=1e-6, atol=1e-7)
    refused = score(df, "demo", "features", url=GRPC_URL, keys=["id"], regions="nowhere", retries=0)
    with pytest.raises(Exception) as error:
        refused.collect()
    text = str(error.value)
    assert "model 'demo'" in text and "FAILED_PRECONDITION" in text and "nowhere" in text, text


# ------------------------------------------------- errors before the job

def test_missing_column_raises_before_the_job(stack, spark):
    df, _ = _demo_frame(spark, rows=10, partitions=1)

    def check():
        with pytest.raises(SchemaError, match="column 'feats'.*model 'demo' input 'INPUT0'"):
            score(df, "demo", {"INPUT0": "feats"}, url=GRPC_URL)
    _no_job_ran(spark, "missing-column", check)

    def missing_key():
        with pytest.raises(SchemaError, match="key column 'nope'"):
            score(df, "demo", "features", url=GRPC_URL, keys=["nope"])
    _no_job_ran(spark, "missing-key", missing_key)


@pytest.mark.parametrize("column,expected", [
    ("label", "string"),      # a string column for an FP32 vector input
    ("amount", "double"),     # a scalar for a vector input
])
def test_mistyped_column_raises_before_the_job(stack, spark, column, expected):
    df, _ = _demo_frame(spark, rows=10, partitions=1)

    def check():
        with pytest.raises(SchemaError) as error:
            score(df, "demo", column, url=GRPC_URL)
        message = str(error.value)
        assert f"column '{column}' is {expected}" in message, message
        assert "INPUT0" in message and "array<numeric>" in message, message
    _no_job_ran(spark, f"mistyped-{column}", check)


def test_float_array_for_int_input_raises(stack, spark):
    df, _ = _demo_frame(spark, rows=10, partitions=1)
    # INPUT0 gets an int array, INPUT1 the float one: the error names INPUT1's column.
    df = df.withColumn("ints", df["features"].cast("array<int>"))
    with pytest.raises(SchemaError, match="column 'features' is array<float>.*'simple' input 'INPUT1'"):
        score(df, "simple", {"INPUT0": "ints", "INPUT1": "features"}, url=GRPC_URL, outputs="OUTPUT0")


def test_wrong_model_name_raises_naming_it(stack, spark):
    df, _ = _demo_frame(spark, rows=10, partitions=1)

    def check():
        with pytest.raises(ShamalError) as error:
            score(df, "no_such_model", "features", url=GRPC_URL, retries=0)
        assert error.value.code == "NOT_FOUND"
        assert error.value.model == "no_such_model"
        assert "no_such_model" in str(error.value) and "NOT_FOUND" in str(error.value)
    _no_job_ran(spark, "wrong-model", check)
    with pytest.raises(ShamalError, match="model 'demo' version 9: (NOT_FOUND|INVALID_ARGUMENT)"):
        score(df, "demo", "features", url=GRPC_URL, version=9, retries=0)
    with pytest.raises(SchemaError, match="model 'demo' has no output 'OUT9'"):
        score(df, "demo", "features", "OUT9", url=GRPC_URL)


# ------------------------- headers, token rotation, retries (fake router)

class _FakeRouter(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Model 'sum': x FP32 [-1, 2] -> y FP64 [-1] (the row's sum), batches
    of at most 8. Records each call's metadata; fails the next `fail_next`
    ModelInfer calls with `fail_code`; refuses calls whose token is not
    `accept` with PERMISSION_DENIED when `accept` is set."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls = []
        self.fail_next = 0
        self.fail_code = grpc.StatusCode.RESOURCE_EXHAUSTED
        self.accept = None

    def _record(self, method, context):
        metadata = dict(context.invocation_metadata())
        with self.lock:
            self.calls.append((method, metadata))
        if self.accept is not None and metadata.get("authorization") != f"Bearer {self.accept}":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "lacks permission 'models:infer'")

    def ModelMetadata(self, request, context):
        self._record("ModelMetadata", context)
        if request.name != "sum":
            context.abort(grpc.StatusCode.NOT_FOUND, f"model '{request.name}' not found")
        T = service_pb2.ModelMetadataResponse.TensorMetadata
        return service_pb2.ModelMetadataResponse(
            name="sum", versions=["1"], platform="fake",
            inputs=[T(name="x", datatype="FP32", shape=[-1, 2])],
            outputs=[T(name="y", datatype="FP64", shape=[-1])])

    def ModelConfig(self, request, context):
        self._record("ModelConfig", context)
        from tritonclient.grpc import model_config_pb2

        return service_pb2.ModelConfigResponse(config=model_config_pb2.ModelConfig(name="sum", max_batch_size=8))

    def ModelInfer(self, request, context):
        self._record("ModelInfer", context)
        with self.lock:
            fail = self.fail_next > 0
            self.fail_next -= 1 if fail else 0
        if fail:
            context.abort(self.fail_code, "overloaded: try later")
        shape = list(request.inputs[0].shape)
        if shape[0] > 8:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"batch {shape[0]} over max_batch_size 8")
        x = np.frombuffer(request.raw_input_contents[0], dtype=np.float32).reshape(shape)
        y = x.astype(np.float64).sum(axis=1)
        return service_pb2.ModelInferResponse(
            model_name="sum", model_version="1",
            outputs=[service_pb2.ModelInferResponse.InferOutputTensor(name="y", datatype="FP64", shape=[len(y)])],
            raw_output_contents=[y.tobytes()])


@pytest.fixture()
def fake_router():
    servicer = _FakeRouter()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def _sum_frame(spark, rows=100):
    import pandas as pd

    x = np.random.default_rng(3).standard_normal((rows, 2)).astype(np.float32)
    df = spark.createDataFrame(pd.DataFrame({"id": np.arange(rows), "x": list(x)})).repartition(2)
    return df, x


def test_token_tenant_and_regions_are_sent(spark, fake_router, tmp_path):
    from pyspark.sql import types as T

    servicer, url = fake_router
    df, x = _sum_frame(spark)
    token_file = tmp_path / "token"
    token_file.write_text("tok-1\n")
    servicer.accept = "tok-1"
    scored = score(df, "sum", "x", url=url, keys=["id"], token_file=str(token_file), tenant="acme",
                   regions=["me-central-1", "me-south-1"])
    assert scored.schema["y"].dataType == T.DoubleType()
    out = _by_id(scored)
    np.testing.assert_array_equal(out["y"].to_numpy(), x.astype(np.float64).sum(axis=1))
    infers = [m for method, m in servicer.calls if method == "ModelInfer"]
    assert len(infers) >= len(x) // 8  # batches capped at the model's max_batch_size
    for method, metadata in servicer.calls:
        assert metadata.get("authorization") == "Bearer tok-1", (method, metadata)
        assert metadata.get("x-shamal-tenant") == "acme", (method, metadata)
        assert metadata.get("x-shamal-allowed-regions") == "me-central-1,me-south-1", (method, metadata)

    # A rotated token is read again by the next job's partitions.
    token_file.write_text("tok-2\n")
    servicer.accept = "tok-2"
    servicer.calls.clear()
    out = _by_id(scored)
    np.testing.assert_array_equal(out["y"].to_numpy(), x.astype(np.float64).sum(axis=1))
    assert {m.get("authorization") for _, m in servicer.calls} == {"Bearer tok-2"}

    # A token the router refuses: PERMISSION_DENIED from score(), naming the model.
    with pytest.raises(ShamalError, match="model 'sum': PERMISSION_DENIED"):
        score(df, "sum", "x", url=url, token="wrong")


def test_overload_is_retried(spark, fake_router):
    servicer, url = fake_router
    df, x = _sum_frame(spark, rows=40)
    servicer.fail_next = 3
    out = _by_id(score(df, "sum", "x", url=url, keys=["id"], retries=5))
    np.testing.assert_array_equal(out["y"].to_numpy(), x.astype(np.float64).sum(axis=1))
    assert servicer.fail_next <= 0
    servicer.fail_code = grpc.StatusCode.UNAVAILABLE
    servicer.fail_next = 2
    out = _by_id(score(df, "sum", "x", url=url, keys=["id"], retries=5))
    np.testing.assert_array_equal(out["y"].to_numpy(), x.astype(np.float64).sum(axis=1))


def test_overload_beyond_retries_fails_naming_model_and_code(spark, fake_router):
    servicer, url = fake_router
    df, _ = _sum_frame(spark, rows=20)
    scored = score(df, "sum", "x", url=url, keys=["id"], retries=1)
    servicer.fail_next = 10 ** 6
    with pytest.raises(Exception) as error:
        scored.collect()
    text = str(error.value)
    assert "model 'sum'" in text and "RESOURCE_EXHAUSTED" in text and "gave up after 1 retries" in text, text
