#!/usr/bin/env python3
"""Deterministic generator for the gpu-worker's (candle) test/demo models.

Writes a Triton-layout model repository of safetensors MLPs plus reference
outputs computed independently here, with numpy in float64:

    models/gpu/repository/<model>/<version>/model.json          (model spec)
    models/gpu/repository/<model>/<version>/model.safetensors   (weights; the
        spec is also embedded in its header metadata, "shamal.model_spec",
        so the single file is a self-contained registry artifact)
    models/gpu/repository/<model>/config.pbtxt                  (some models)
    models/gpu/reference/<model>.json                           (inputs/outputs)

Usage (from the repository root):

    .deps/venv/bin/python models/generate_gpu.py             # -> models/gpu
    .deps/venv/bin/python models/generate_gpu.py --out DIR   # elsewhere

Only numpy is needed: safetensors files are written by the small writer
below (8-byte little-endian header size, JSON header, raw little-endian
tensor bytes). Every weight comes from a fixed-seed numpy Generator, so
re-running the script produces byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np

SPEC_METADATA_KEY = "shamal.model_spec"

# (name, spec, config.pbtxt or None, seed)
MODELS = [
    (
        "mlp_demo",
        {
            "architecture": "mlp",
            "input_name": "INPUT0",
            "output_name": "OUTPUT0",
            "input_dim": 16,
            "hidden": [32, 32],
            "output_dim": 4,
            "activation": "relu",
            "output": "softmax",
            "dtype": "float32",
            "device": "auto",
        },
        None,
        20240601,
    ),
    (
        "mlp_regressor",
        {
            "architecture": "mlp",
            "input_name": "features",
            "output_name": "values",
            "input_dim": 8,
            "hidden": [16],
            "output_dim": 3,
            "activation": "gelu",
            "output": "identity",
            "dtype": "float32",
            "device": "auto",
        },
        'name: "mlp_regressor"\n'
        'backend: "candle"\n'
        "max_batch_size: 8\n"
        "dynamic_batching { max_queue_delay_microseconds: 2000 }\n",
        20240602,
    ),
]

REFERENCE_ROWS = 6


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    chunks = []
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name], dtype="<f4")
        data = array.tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        chunks.append(data)
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as file:
        file.write(len(text).to_bytes(8, "little"))
        file.write(text)
        for chunk in chunks:
            file.write(chunk)


def weights_for(spec: dict, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    widths = [spec["input_dim"], *spec["hidden"], spec["output_dim"]]
    tensors = {}
    for index, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
        bound = 1.0 / math.sqrt(fan_in)
        tensors[f"layers.{index}.weight"] = rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32)
        tensors[f"layers.{index}.bias"] = rng.uniform(-bound, bound, (fan_out,)).astype(np.float32)
    return tensors


_erf = np.vectorize(math.erf)


def forward(spec: dict, tensors: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The reference: float64 numpy, independent of candle."""
    h = x.astype(np.float64)
    layers = len(spec["hidden"]) + 1
    for index in range(layers):
        w = tensors[f"layers.{index}.weight"].astype(np.float64)
        b = tensors[f"layers.{index}.bias"].astype(np.float64)
        h = h @ w.T + b
        if index < layers - 1:
            if spec["activation"] == "relu":
                h = np.maximum(h, 0.0)
            elif spec["activation"] == "gelu":
                h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
            elif spec["activation"] == "tanh":
                h = np.tanh(h)
            else:
                raise ValueError(spec["activation"])
    if spec["output"] == "softmax":
        e = np.exp(h - h.max(axis=-1, keepdims=True))
        h = e / e.sum(axis=-1, keepdims=True)
    return h


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "gpu")
    args = parser.parse_args()
    repository = args.out / "repository"
    reference = args.out / "reference"
    for directory in (repository, reference):
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)

    for name, spec, config, seed in MODELS:
        version = repository / name / "1"
        version.mkdir(parents=True)
        spec_text = json.dumps(spec, indent=2) + "\n"
        (version / "model.json").write_text(spec_text)
        tensors = weights_for(spec, seed)
        write_safetensors(
            version / "model.safetensors",
            tensors,
            {SPEC_METADATA_KEY: json.dumps(spec, separators=(",", ":"), sort_keys=True)},
        )
        if config is not None:
            (repository / name / "config.pbtxt").write_text(config)

        rng = np.random.default_rng(seed + 1000)
        x = rng.standard_normal((REFERENCE_ROWS, spec["input_dim"])).astype(np.float32)
        y = forward(spec, tensors, x)
        (reference / f"{name}.json").write_text(
            json.dumps(
                {
                    "model": name,
                    "input_name": spec["input_name"],
                    "output_name": spec["output_name"],
                    "input": [[float(v) for v in row] for row in x],
                    "output": [[float(v) for v in row] for row in y],
                    "tolerance": {"abs": 1e-5, "rel": 1e-4},
                    "computed_by": "numpy float64 (models/generate_gpu.py)",
                },
                indent=1,
            )
            + "\n"
        )
        print(f"wrote {name}: {spec['input_dim']}->{spec['hidden']}->{spec['output_dim']} "
              f"{spec['activation']}/{spec['output']}, reference {x.shape} -> {y.shape}")

    total = sum(path.stat().st_size for path in args.out.rglob("*") if path.is_file())
    print(f"total size: {total} bytes")
    if total > 100 * 1024:
        print("fixtures grew past 100 KiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
