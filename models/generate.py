#!/usr/bin/env python3
"""Deterministic generator for Shamal's test/demo ONNX model repository.

Writes a Triton-layout model repository:

    <out>/<model>/<version>/model.onnx
    <out>/<model>/config.pbtxt          (only for models that need one)

Usage (from the repository root):

    .deps/venv/bin/python models/generate.py                 # -> models/repository
    .deps/venv/bin/python models/generate.py --out DIR       # elsewhere
    .deps/venv/bin/python models/generate.py --large DIR     # only mlp_large (benchmark)

Every weight comes from a fixed-seed numpy Generator, so re-running the script
produces byte-identical model files.  After writing, every model is loaded and
run in onnxruntime and a one-line check is printed per model; any failure exits
non-zero.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
# IR version 8 is the one that goes with opset 17; onnxruntime 1.31 loads it.
IR_VERSION = 8
PRODUCER = "shamal-models-generate"

# Size ceiling for the committed repository (the big benchmark model is never
# written there).
MAX_REPO_BYTES = 512 * 1024


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def _make_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER,
        producer_version="1",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def _save(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name=name)


# --------------------------------------------------------------------------
# demo: small MLP classifier
# --------------------------------------------------------------------------

def demo_weights():
    rng = np.random.default_rng(20240601)
    w1 = (rng.standard_normal((16, 32)) * 0.5).astype(np.float32)
    b1 = (rng.standard_normal((32,)) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((32, 4)) * 0.5).astype(np.float32)
    b2 = (rng.standard_normal((4,)) * 0.1).astype(np.float32)
    return w1, b1, w2, b2


def _mlp_io(in_dim: int, out_dim: int):
    x = helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", in_dim])
    y = helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", out_dim])
    return x, y


def build_demo() -> onnx.ModelProto:
    """INPUT0 FP32 [batch,16] -> Gemm(16x32)+Relu -> Gemm(32x4) -> Softmax."""
    w1, b1, w2, b2 = demo_weights()
    x, y = _mlp_io(16, 4)
    nodes = [
        helper.make_node("Gemm", ["INPUT0", "W1", "B1"], ["h1"], name="fc1"),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("Gemm", ["a1", "W2", "B2"], ["logits"], name="fc2"),
        helper.make_node("Softmax", ["logits"], ["OUTPUT0"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "demo", [x], [y],
        initializer=[_init("W1", w1), _init("B1", b1), _init("W2", w2), _init("B2", b2)],
    )
    return _make_model(graph)


def build_demo_matmul() -> onnx.ModelProto:
    """Same function as demo, expressed as MatMul+Add so quantize_dynamic
    turns the matrix products into MatMulInteger."""
    w1, b1, w2, b2 = demo_weights()
    x, y = _mlp_io(16, 4)
    nodes = [
        helper.make_node("MatMul", ["INPUT0", "W1"], ["m1"], name="fc1_matmul"),
        helper.make_node("Add", ["m1", "B1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
        helper.make_node("MatMul", ["a1", "W2"], ["m2"], name="fc2_matmul"),
        helper.make_node("Add", ["m2", "B2"], ["logits"], name="fc2_bias"),
        helper.make_node("Softmax", ["logits"], ["OUTPUT0"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "demo_int8", [x], [y],
        initializer=[_init("W1", w1), _init("B1", b1), _init("W2", w2), _init("B2", b2)],
    )
    return _make_model(graph)


def build_demo_int8() -> onnx.ModelProto:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic logs a "consider pre-processing" hint at WARNING level.
    logging.getLogger().setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "demo_fp32.onnx"
        dst = Path(tmp) / "demo_int8.onnx"
        onnx.save_model(build_demo_matmul(), str(src))
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=False,
            reduce_range=False,
        )
        model = onnx.load(str(dst))

    op_types = sorted({n.op_type for n in model.graph.node})
    int8_inits = [i.name for i in model.graph.initializer if i.data_type == TensorProto.INT8]
    if "MatMulInteger" not in op_types or "DynamicQuantizeLinear" not in op_types:
        raise SystemExit(f"demo_int8: quantize_dynamic produced no integer ops: {op_types}")
    if not int8_inits:
        raise SystemExit("demo_int8: quantize_dynamic produced no INT8 initializers")
    print(f"demo_int8: quantised ops {op_types}; INT8 initializers: {', '.join(sorted(int8_inits))}")
    onnx.checker.check_model(model, full_check=True)
    return model


DEMO_CONFIG = """\
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [
  {{
    name: "INPUT0"
    data_type: TYPE_FP32
    dims: [ 16 ]
  }}
]
output [
  {{
    name: "OUTPUT0"
    data_type: TYPE_FP32
    dims: [ 4 ]
  }}
]
dynamic_batching {{
  # Batch whatever queued while the instance was busy; waiting longer
  # would add latency at low load for no gain on 2 cores.
  max_queue_delay_microseconds: 0
}}
instance_group [
  {{
    count: 1
    kind: KIND_CPU
  }}
]
"""

# demo_int8's config leaves input/output out on purpose: the server must
# complete them from the ONNX graph (as Triton's auto-complete does).
DEMO_INT8_CONFIG = """\
name: "demo_int8"
platform: "onnxruntime_onnx"
max_batch_size: 64
dynamic_batching {
  # Batch whatever queued while the instance was busy; waiting longer
  # would add latency at low load for no gain on 2 cores.
  max_queue_delay_microseconds: 0
}
instance_group [
  {
    count: 1
    kind: KIND_CPU
  }
]
"""


# --------------------------------------------------------------------------
# simple: Triton's classic add/sub example, two versions
# --------------------------------------------------------------------------

def build_simple(version: int) -> onnx.ModelProto:
    dims = ["batch", 16]
    inputs = [
        helper.make_tensor_value_info("INPUT0", TensorProto.INT32, dims),
        helper.make_tensor_value_info("INPUT1", TensorProto.INT32, dims),
    ]
    outputs = [
        helper.make_tensor_value_info("OUTPUT0", TensorProto.INT32, dims),
        helper.make_tensor_value_info("OUTPUT1", TensorProto.INT32, dims),
    ]
    inits = []
    if version == 1:
        nodes = [helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"], name="add")]
    elif version == 2:
        inits.append(_init("ONE", np.array(1, dtype=np.int32)))
        nodes = [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["sum"], name="add"),
            helper.make_node("Add", ["sum", "ONE"], ["OUTPUT0"], name="add_one"),
        ]
    else:
        raise ValueError(version)
    nodes.append(helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"], name="sub"))
    graph = helper.make_graph(nodes, "simple", inputs, outputs, initializer=inits)
    return _make_model(graph)


# --------------------------------------------------------------------------
# identity models (datatype coverage)
# --------------------------------------------------------------------------

def build_identity(name: str, specs) -> onnx.ModelProto:
    """specs: list of (input_name, output_name, elem_type, shape)."""
    inputs, outputs, nodes = [], [], []
    for i, (iname, oname, etype, shape) in enumerate(specs):
        inputs.append(helper.make_tensor_value_info(iname, etype, shape))
        outputs.append(helper.make_tensor_value_info(oname, etype, shape))
        nodes.append(helper.make_node("Identity", [iname], [oname], name=f"identity{i}"))
    graph = helper.make_graph(nodes, name, inputs, outputs)
    return _make_model(graph)


IDENTITY_FP16_CONFIG = """\
name: "identity_fp16"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  {
    name: "INPUT0"
    data_type: TYPE_FP16
    dims: [ -1 ]
  }
]
output [
  {
    name: "OUTPUT0"
    data_type: TYPE_FP16
    dims: [ -1 ]
  }
]
"""


# --------------------------------------------------------------------------
# mlp_large: compute-bound benchmark model (never committed)
# --------------------------------------------------------------------------

def build_mlp_large() -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    sizes = [512, 2048, 2048, 512]
    inits, nodes = [], []
    prev = "INPUT0"
    for layer, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        # He-style scaling keeps activations in a sane range through the ReLUs.
        w = (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(np.float32)
        b = np.zeros((n_out,), dtype=np.float32)
        inits += [_init(f"W{layer}", w), _init(f"B{layer}", b)]
        out = "OUTPUT0" if layer == len(sizes) - 1 else f"h{layer}"
        nodes.append(helper.make_node("Gemm", [prev, f"W{layer}", f"B{layer}"], [out], name=f"fc{layer}"))
        if out != "OUTPUT0":
            nodes.append(helper.make_node("Relu", [out], [f"a{layer}"], name=f"relu{layer}"))
            prev = f"a{layer}"
    x, y = _mlp_io(512, 512)
    graph = helper.make_graph(nodes, "mlp_large", [x], [y], initializer=inits)
    return _make_model(graph)


MLP_LARGE_CONFIG = """\
name: "mlp_large"
platform: "onnxruntime_onnx"
max_batch_size: 64
input [
  {
    name: "INPUT0"
    data_type: TYPE_FP32
    dims: [ 512 ]
  }
]
output [
  {
    name: "OUTPUT0"
    data_type: TYPE_FP32
    dims: [ 512 ]
  }
]
dynamic_batching {
  max_queue_delay_microseconds: 0
}
instance_group [
  {
    count: 1
    kind: KIND_CPU
  }
]
"""


# --------------------------------------------------------------------------
# verification in onnxruntime
# --------------------------------------------------------------------------

def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ok(name: str, msg: str) -> None:
    print(f"check {name}: OK ({msg})")


def _fail(name: str, msg: str) -> None:
    raise SystemExit(f"check {name}: FAILED: {msg}")


def verify_repository(out: Path, names) -> None:
    rng = np.random.default_rng(1234)

    if "demo" in names or "demo_int8" in names:
        x = rng.standard_normal((5, 16)).astype(np.float32)
        demo_out = None
        if "demo" in names:
            (demo_out,) = _session(out / "demo/1/model.onnx").run(None, {"INPUT0": x})
            if demo_out.shape != (5, 4) or demo_out.dtype != np.float32:
                _fail("demo", f"bad output {demo_out.shape} {demo_out.dtype}")
            if not np.allclose(demo_out.sum(axis=1), 1.0, atol=1e-5):
                _fail("demo", "rows do not sum to 1")
            # Same maths in numpy.
            w1, b1, w2, b2 = demo_weights()
            logits = np.maximum(x @ w1 + b1, 0) @ w2 + b2
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            ref = e / e.sum(axis=1, keepdims=True)
            if not np.allclose(demo_out, ref, atol=1e-5):
                _fail("demo", "does not match the numpy reference")
            _ok("demo", f"[5,16]->[5,4], rows sum to 1, argmax {demo_out.argmax(1).tolist()}")
        if "demo_int8" in names:
            (q_out,) = _session(out / "demo_int8/1/model.onnx").run(None, {"INPUT0": x})
            if q_out.shape != (5, 4) or not np.allclose(q_out.sum(axis=1), 1.0, atol=1e-5):
                _fail("demo_int8", f"bad output {q_out.shape} / rows don't sum to 1")
            if demo_out is not None:
                diff = float(np.abs(q_out - demo_out).max())
                if diff > 0.05:
                    _fail("demo_int8", f"max |int8 - fp32| = {diff} > 0.05")
                _ok("demo_int8", f"max |int8 - fp32| = {diff:.4f}")
            else:
                _ok("demo_int8", "runs, rows sum to 1")

    if "simple" in names:
        a = rng.integers(-1000, 1000, size=(3, 16), dtype=np.int32)
        b = rng.integers(-1000, 1000, size=(3, 16), dtype=np.int32)
        for version, extra in ((1, 0), (2, 1)):
            o0, o1 = _session(out / f"simple/{version}/model.onnx").run(
                ["OUTPUT0", "OUTPUT1"], {"INPUT0": a, "INPUT1": b})
            if o0.dtype != np.int32 or not np.array_equal(o0, a + b + extra) or not np.array_equal(o1, a - b):
                _fail(f"simple v{version}", "wrong add/sub result")
        _ok("simple", "v1 OUTPUT0=a+b, v2 OUTPUT0=a+b+1, OUTPUT1=a-b")

    if "identity_fp16" in names:
        x = rng.standard_normal((2, 7)).astype(np.float16)
        (y,) = _session(out / "identity_fp16/1/model.onnx").run(None, {"INPUT0": x})
        if y.dtype != np.float16 or not np.array_equal(x, y):
            _fail("identity_fp16", "round trip mismatch")
        _ok("identity_fp16", "[2,7] fp16 round trip")

    if "identity_bytes" in names:
        # onnxruntime's Python API takes/returns str for STRING tensors.
        x = np.array([["hello"], [""], ["ünï côdé"]], dtype=np.object_)
        (y,) = _session(out / "identity_bytes/1/model.onnx").run(None, {"INPUT0": x})
        if y.shape != (3, 1) or y.ravel().tolist() != x.ravel().tolist():
            _fail("identity_bytes", f"round trip mismatch: {y!r}")
        _ok("identity_bytes", "[3,1] string round trip")

    if "identity_bool_i8" in names:
        b = np.array([[True, False, True, False], [False, False, True, True]])
        i8 = np.array([[-128, -1, 0, 127], [1, 2, 3, 4]], dtype=np.int8)
        ob, oi = _session(out / "identity_bool_i8/1/model.onnx").run(
            ["OUTPUT0", "OUTPUT1"], {"INPUT0": b, "INPUT1": i8})
        if ob.dtype != np.bool_ or oi.dtype != np.int8 or not np.array_equal(ob, b) or not np.array_equal(oi, i8):
            _fail("identity_bool_i8", "round trip mismatch")
        _ok("identity_bool_i8", "bool + int8 round trip")

    if "mlp_large" in names:
        x = rng.standard_normal((4, 512)).astype(np.float32)
        (y,) = _session(out / "mlp_large/1/model.onnx").run(None, {"INPUT0": x})
        if y.shape != (4, 512) or not np.all(np.isfinite(y)):
            _fail("mlp_large", f"bad output {y.shape}")
        _ok("mlp_large", "[4,512]->[4,512], finite")


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

SMALL_MODELS = ["demo", "simple", "identity_fp16", "identity_bytes", "identity_bool_i8", "demo_int8"]


def write_small(out: Path) -> None:
    for name in SMALL_MODELS:
        # Start each model directory clean so stale versions/configs vanish.
        if (out / name).exists():
            shutil.rmtree(out / name)

    _save(build_demo(), out / "demo/1/model.onnx")
    _write_text(out / "demo/config.pbtxt", DEMO_CONFIG.format(name="demo"))

    _save(build_simple(1), out / "simple/1/model.onnx")
    _save(build_simple(2), out / "simple/2/model.onnx")

    _save(build_identity("identity_fp16", [("INPUT0", "OUTPUT0", TensorProto.FLOAT16, ["batch", "n"])]),
          out / "identity_fp16/1/model.onnx")
    _write_text(out / "identity_fp16/config.pbtxt", IDENTITY_FP16_CONFIG)

    _save(build_identity("identity_bytes", [("INPUT0", "OUTPUT0", TensorProto.STRING, ["batch", 1])]),
          out / "identity_bytes/1/model.onnx")

    _save(build_identity("identity_bool_i8", [
        ("INPUT0", "OUTPUT0", TensorProto.BOOL, ["batch", 4]),
        ("INPUT1", "OUTPUT1", TensorProto.INT8, ["batch", 4]),
    ]), out / "identity_bool_i8/1/model.onnx")

    _save(build_demo_int8(), out / "demo_int8/1/model.onnx")
    _write_text(out / "demo_int8/config.pbtxt", DEMO_INT8_CONFIG)

    verify_repository(out, SMALL_MODELS)

    total = sum(f.stat().st_size for name in SMALL_MODELS for f in (out / name).rglob("*") if f.is_file())
    print(f"repository {out}: {len(SMALL_MODELS)} models, {total} bytes total")
    if total > MAX_REPO_BYTES:
        raise SystemExit(f"repository too large: {total} bytes > {MAX_REPO_BYTES}")


def write_large(out: Path) -> None:
    if (out / "mlp_large").exists():
        shutil.rmtree(out / "mlp_large")
    model = build_mlp_large()
    params = sum(int(np.prod(i.dims)) for i in model.graph.initializer)
    _save(model, out / "mlp_large/1/model.onnx")
    _write_text(out / "mlp_large/config.pbtxt", MLP_LARGE_CONFIG)
    print(f"mlp_large: {params} parameters, {(out / 'mlp_large/1/model.onnx').stat().st_size} bytes")
    verify_repository(out, ["mlp_large"])


def main(argv=None) -> int:
    here = Path(__file__).resolve().parent
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=here / "repository",
                   help="model repository to write the small models into (default: models/repository)")
    p.add_argument("--large", type=Path, metavar="DIR",
                   help="write only the benchmark model mlp_large into DIR")
    args = p.parse_args(argv)

    if args.large is not None:
        write_large(args.large)
    else:
        write_small(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
