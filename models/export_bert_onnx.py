#!/usr/bin/env python3
"""Exports a gpu-worker sentence encoder (safetensors + JSON spec, the
all-MiniLM-L6-v2 architecture: models/gpu/README.md) to ONNX, so the same
weights can be served by the cpu-worker on ONNX Runtime.

The graph is built with the `onnx` package's helper API from the numpy
weights (no torch): Gather embeddings, LayerNormalization, MatMul/Add
projections, scaled dot-product attention with an additive mask bias,
Softmax, exact GELU in its Erf form (ONNX Runtime fuses it), mean pooling
over the attention mask and L2 normalisation. Opset 17.

    input_ids       INT64 [batch, tokens]
    attention_mask  INT64 [batch, tokens]   (1 = token, 0 = padding)
    embedding       FP32  [batch, hidden]

Before writing, the script checks ONNX Runtime's output on a padded batch of
random sequences against the numpy float64 reference of
models/generate_gpu.py (computed per sequence, unpadded) and fails beyond
the tolerance. `--bench` then times ONNX Runtime in process.

    .deps/venv/bin/python models/export_bert_onnx.py \\
        --spec DIR/model.json [--weights DIR/model.safetensors] --out DIR/model.onnx \\
        [--bench --batch 1,8,32,128 --seq-len 32 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_gpu import SPEC_METADATA_KEY, encoder_forward  # noqa: E402

OPSET = 17
MASKED = -1e9  # added to the scores of padding: exp() of it is exactly 0 in FP32

# Agreement of ONNX Runtime (FP32) with the numpy float64 reference.
TOLERANCE_ABS = 1e-5
TOLERANCE_REL = 1e-4

DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8"}


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors (as float32, BF16 widened) and the header metadata."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    metadata = header.pop("__metadata__", {}) or {}
    body = memoryview(data)[8 + size :]
    tensors = {}
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        raw = body[start:end]
        if entry["dtype"] == "BF16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            array = bits.view(np.float32)
        elif entry["dtype"] in DTYPES:
            array = np.frombuffer(raw, dtype=DTYPES[entry["dtype"]])
        else:
            raise ValueError(f"{path}: {name} has unsupported dtype {entry['dtype']}")
        tensors[name] = array.reshape(entry["shape"])
    return tensors, metadata


def load(spec_path: Path, weights: Path | None) -> tuple[dict, dict[str, np.ndarray]]:
    if spec_path.suffix == ".safetensors":
        tensors, metadata = read_safetensors(spec_path)
        spec = json.loads(metadata[SPEC_METADATA_KEY])
    else:
        spec = json.loads(spec_path.read_text())
        weights = weights or spec_path.parent / spec.get("weights", "model.safetensors")
        tensors, _ = read_safetensors(weights)
    if spec.get("architecture") != "bert_encoder":
        raise ValueError(f"{spec_path}: not a bert_encoder spec")
    spec.setdefault("type_vocab_size", 2)
    spec.setdefault("layer_norm_eps", 1e-12)
    spec.setdefault("normalize", True)
    spec.setdefault("max_seq_len", spec["max_position"])
    # HuggingFace BertModel names, with or without the "bert." prefix; the
    # pooler head and position_ids are not part of the encoder.
    weights_f32 = {}
    for name, array in tensors.items():
        name = name.removeprefix("bert.")
        if name.startswith("pooler.") or name == "embeddings.position_ids":
            continue
        weights_f32[name] = np.ascontiguousarray(array, dtype=np.float32)
    return spec, weights_f32


def build_graph(spec: dict, t: dict[str, np.ndarray]):
    from onnx import TensorProto, helper, numpy_helper

    hidden, heads = spec["hidden"], spec["heads"]
    head_dim = hidden // heads
    eps = float(spec["layer_norm_eps"])
    nodes, initializers = [], []

    def const(name: str, array: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    counter = iter(range(1_000_000))

    def node(op: str, inputs: list[str], **attributes) -> str:
        output = f"{op.lower()}_{next(counter)}"
        nodes.append(helper.make_node(op, inputs, [output], **attributes))
        return output

    def linear(x: str, name: str) -> str:
        # HuggingFace stores [out, in]; MatMul wants [in, out].
        weight = const(f"{name}.weight_t", t[f"{name}.weight"].T.copy())
        bias = const(f"{name}.bias", t[f"{name}.bias"])
        return node("Add", [node("MatMul", [x, weight]), bias])

    def layer_norm(x: str, name: str) -> str:
        return node(
            "LayerNormalization",
            [x, const(f"{name}.weight", t[f"{name}.weight"]), const(f"{name}.bias", t[f"{name}.bias"])],
            axis=-1,
            epsilon=eps,
        )

    i64 = lambda *values: np.array(values, dtype=np.int64)  # noqa: E731
    f32 = lambda value: np.array(value, dtype=np.float32)  # noqa: E731

    # Embeddings: word + position + token type 0.
    word = node("Gather", [const("embeddings.word_embeddings.weight", t["embeddings.word_embeddings.weight"]), "input_ids"], axis=0)
    length = node("Gather", [node("Shape", ["input_ids"]), const("one_scalar", np.array(1, dtype=np.int64))], axis=0)
    positions = node("Range", [const("zero_scalar", np.array(0, dtype=np.int64)), length, "one_scalar"])
    position = node("Gather", [const("embeddings.position_embeddings.weight", t["embeddings.position_embeddings.weight"]), positions], axis=0)
    token_type = const("token_type_0", t["embeddings.token_type_embeddings.weight"][0])
    x = layer_norm(node("Add", [node("Add", [word, position]), token_type]), "embeddings.LayerNorm")

    # Mask: float [B, S], and the additive attention bias [B, 1, 1, S].
    mask = node("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    bias = node("Mul", [node("Sub", [const("one_f", f32(1.0)), mask]), const("masked", f32(MASKED))])
    bias = node("Unsqueeze", [bias, const("axes_1_2", i64(1, 2))])

    split_shape = const("split_shape", i64(0, 0, heads, head_dim))
    merge_shape = const("merge_shape", i64(0, 0, hidden))
    scale = const("scale", f32(1.0 / math.sqrt(head_dim)))
    for index in range(spec["layers"]):
        prefix = f"encoder.layer.{index}"

        def heads_of(name: str, perm: list[int]) -> str:
            projected = linear(x, f"{prefix}.attention.self.{name}")
            return node("Transpose", [node("Reshape", [projected, split_shape])], perm=perm)

        query = heads_of("query", [0, 2, 1, 3])  # [B, h, S, d]
        key = heads_of("key", [0, 2, 3, 1])  # [B, h, d, S]
        value = heads_of("value", [0, 2, 1, 3])  # [B, h, S, d]
        scores = node("Add", [node("Mul", [node("MatMul", [query, key]), scale]), bias])
        probs = node("Softmax", [scores], axis=-1)
        context = node("Reshape", [node("Transpose", [node("MatMul", [probs, value])], perm=[0, 2, 1, 3]), merge_shape])
        attended = layer_norm(
            node("Add", [linear(context, f"{prefix}.attention.output.dense"), x]),
            f"{prefix}.attention.output.LayerNorm",
        )
        inner = linear(attended, f"{prefix}.intermediate.dense")
        # Exact GELU: 0.5 * x * (1 + erf(x / sqrt(2))).
        erf = node("Erf", [node("Div", [inner, const(f"sqrt2_{index}", f32(math.sqrt(2.0)))])])
        gelu = node("Mul", [node("Mul", [inner, node("Add", [erf, "one_f"])]), const(f"half_{index}", f32(0.5))])
        x = layer_norm(
            node("Add", [linear(gelu, f"{prefix}.output.dense"), attended]),
            f"{prefix}.output.LayerNorm",
        )

    # Mean over the tokens the mask keeps, then L2 normalisation.
    kept = node("Mul", [x, node("Unsqueeze", [mask, const("axes_2", i64(2))])])
    summed = node("ReduceSum", [kept, const("axes_1", i64(1))], keepdims=0)
    counts = node("Max", [node("ReduceSum", [mask, "axes_1"], keepdims=1), const("tiny_count", f32(1e-9))])
    pooled = node("Div", [summed, counts])
    if spec["normalize"]:
        norm = node("Max", [node("ReduceL2", [pooled], axes=[1], keepdims=1), const("tiny_norm", f32(1e-12))])
        pooled = node("Div", [pooled, norm])
    nodes.append(helper.make_node("Identity", [pooled], ["embedding"]))

    graph = helper.make_graph(
        nodes,
        "bert_encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "tokens"]),
        ],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", hidden])],
        initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="shamal models/export_bert_onnx.py",
    )
    model.ir_version = 8
    return model


def session(model_bytes: bytes, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # As the cpu-worker runs its sessions: idle intra-op threads do not spin.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def verify(spec: dict, tensors: dict[str, np.ndarray], model_bytes: bytes) -> float:
    """Worst deviation of ONNX Runtime from the numpy reference on a padded
    batch; raises beyond the tolerance."""
    rng = np.random.default_rng(7)
    longest = min(spec["max_seq_len"], 24)
    lengths = [longest, 3, longest // 2, 9]
    ids = np.zeros((len(lengths), longest), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(0, spec["vocab_size"], length)
        mask[row, :length] = 1
    actual = session(model_bytes, 1).run(["embedding"], {"input_ids": ids, "attention_mask": mask})[0]
    worst = 0.0
    for row, length in enumerate(lengths):
        expected = encoder_forward(spec, tensors, list(ids[row, :length]), [1] * length)
        error = np.abs(actual[row].astype(np.float64) - expected)
        worst = max(worst, float(error.max()))
        if np.any(error > TOLERANCE_ABS + TOLERANCE_REL * np.abs(expected)):
            raise SystemExit(
                f"ONNX Runtime disagrees with the numpy reference on row {row} "
                f"(length {length}): worst error {float(error.max()):.3g}"
            )
    return worst


def bench(model_bytes: bytes, spec: dict, batches: list[int], seq_len: int, threads: int, duration: float,
          rounds: int = 1) -> list[dict]:
    """Sentences/s per batch size: the best of `rounds` rounds over all sizes."""
    runner = session(model_bytes, threads)
    rng = np.random.default_rng(42)
    measured: dict[int, list[dict]] = {batch: [] for batch in batches}
    for round_number in range(1, rounds + 1):
        if rounds > 1:
            print(f"round {round_number} of {rounds}")
        for batch in batches:
            measured[batch].append(bench_one(runner, spec, rng, batch, seq_len, duration))
    results = []
    for batch, runs in measured.items():
        best = dict(max(runs, key=lambda run: run["sentences_per_s"]))
        if rounds > 1:
            print(f"batch {batch:>4}   best {best['sentences_per_s']:>8.1f} sentences/s   (rounds: "
                  + ", ".join(f"{run['sentences_per_s']:.1f}" for run in runs) + ")")
        best["rounds"] = runs
        results.append(best)
    return results


def bench_one(runner, spec: dict, rng, batch: int, seq_len: int, duration: float) -> dict:
    feed = {
        "input_ids": rng.integers(0, min(100, spec["vocab_size"]), (batch, seq_len)).astype(np.int64),
        "attention_mask": np.ones((batch, seq_len), dtype=np.int64),
    }
    warm_end = time.perf_counter() + 1.0
    while time.perf_counter() < warm_end:
        runner.run(["embedding"], feed)
    latencies = []
    start = time.perf_counter()
    while time.perf_counter() - start < duration or len(latencies) < 3:
        t = time.perf_counter()
        runner.run(["embedding"], feed)
        latencies.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    latencies.sort()
    result = {
        "batch": batch,
        "runs": len(latencies),
        "sentences_per_s": len(latencies) * batch / elapsed,
        "p50_us": round(latencies[len(latencies) // 2] * 1e6),
    }
    print(f"batch {batch:>4}   {result['sentences_per_s']:>10.1f} sentences/s   "
          f"{result['runs']:>6} runs   latency p50 {result['p50_us']} us")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, required=True,
                        help="model.json of a bert_encoder, or a .safetensors embedding its spec")
    parser.add_argument("--weights", type=Path, help="safetensors weights (default: next to model.json)")
    parser.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    parser.add_argument("--bench", action="store_true", help="time ONNX Runtime in process afterwards")
    parser.add_argument("--batch", default="1,8,32,128")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (bench)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per batch size (bench)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds over all batch sizes; each reports its best (bench)")
    parser.add_argument("--json", type=Path, help="write the bench results here")
    args = parser.parse_args()

    spec, tensors = load(args.spec, args.weights)
    model = build_graph(spec, tensors)
    import onnx

    onnx.checker.check_model(model, full_check=True)
    model_bytes = model.SerializeToString()
    worst = verify(spec, tensors, model_bytes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(model_bytes)
    print(f"wrote {args.out}: opset {OPSET}, {len(model.graph.node)} nodes, "
          f"{len(model_bytes) / 1e6:.1f} MB; ONNX Runtime vs numpy float64 reference: "
          f"worst error {worst:.2g} (tolerance {TOLERANCE_ABS:g} + {TOLERANCE_REL:g} x |expected|)")
    if args.bench:
        batches = [int(value) for value in args.batch.split(",")]
        print(f"=== in-process ONNX Runtime: {args.out}, {args.seq_len} tokens, "
              f"{args.threads} intra-op thread(s) ===")
        results = bench(model_bytes, spec, batches, args.seq_len, args.threads, args.duration, args.rounds)
        if args.json:
            args.json.write_text(json.dumps({
                "label": "onnxruntime in-process",
                "seq_len": args.seq_len,
                "threads": args.threads,
                "results": results,
            }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
