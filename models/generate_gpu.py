#!/usr/bin/env python3
"""Deterministic generator for the gpu-worker's (candle) test/demo models.

Writes a Triton-layout model repository of safetensors MLPs and small
random-weight BERT sentence encoders (the all-MiniLM-L6-v2 architecture,
scaled down) plus reference outputs computed independently here, with numpy
in float64:

    models/gpu/repository/<model>/<version>/model.json          (model spec)
    models/gpu/repository/<model>/<version>/model.safetensors   (weights; the
        spec is also embedded in its header metadata, "shamal.model_spec",
        so the single file is a self-contained registry artifact)
    models/gpu/repository/<model>/<version>/tokenizer.json      (text encoders;
        hand-built WordPiece, also embedded as "shamal.tokenizer")
    models/gpu/repository/<model>/config.pbtxt                  (some models)
    models/gpu/reference/<model>.json                           (inputs/outputs)

Usage (from the repository root):

    .deps/venv/bin/python models/generate_gpu.py             # -> models/gpu
    .deps/venv/bin/python models/generate_gpu.py --out DIR   # elsewhere
    .deps/venv/bin/python models/generate_gpu.py --minilm-random DIR
        # only a random-weight encoder of all-MiniLM-L6-v2's dimensions
        # (90 MB, for benchmarks without the real weights; never committed):
        # DIR/model.json + DIR/model.safetensors, token-id inputs

numpy and the PyPI `tokenizers` package (scripts/requirements.txt) are
needed: safetensors files are written by the small writer below (8-byte
little-endian header size, JSON header, raw little-endian tensor bytes), and
`tokenizers` (the Python binding of the Rust crate the worker uses) turns the
reference sentences into token ids. Every weight comes from a fixed-seed
numpy Generator and encoder references are rounded to 12 significant
digits, so re-running the script produces byte-identical files.
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
TOKENIZER_METADATA_KEY = "shamal.tokenizer"

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

# Sentence encoders: (name, spec, seed). Both share their weights (same
# seed); one takes token ids, the other text through its tokenizer.json.
ENCODER_SPEC = {
    "architecture": "bert_encoder",
    "vocab_size": 160,
    "hidden": 32,
    "layers": 2,
    "heads": 4,
    "intermediate": 64,
    "max_position": 40,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "pooling": "mean",
    "normalize": True,
    "max_seq_len": 32,
    "dtype": "float32",
    "device": "auto",
}
ENCODERS = [
    ("minilm_tiny", {**ENCODER_SPEC, "inputs": "token_ids"}, 20240701),
    ("minilm_tiny_text", {**ENCODER_SPEC, "inputs": "text", "tokenizer": "tokenizer.json"}, 20240701),
]

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "the a an is are was on in of to and cat dog sat mat quick brown fox jump over lazy "
    "hello world model serve gpu worker sentence embed shamal rust candle token batch pad "
    "text fast slow"
).split()
CHARACTERS = list("abcdefghijklmnopqrstuvwxyz0123456789")
PIECES = ["##s", "##ed", "##ing", "##er", "##ly", "##ding", "##d"]
PUNCTUATION = list(".,!?'-:;()")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world!",
    "GPU workers serve sentence embeddings.",
    "Café crème",
    "a",
    "SHAMAL serves the candle model quickly; the token batch is padded.",
    # Longer than max_seq_len: truncated.
    "the cat sat on the mat " * 8,
    "naïve 東京 test",
    "unknown€symbol xyzzy",
    "   spaces   around   ",
]

# Token-id rows: (length, client padding at the end, a masked token inside).
ID_ROWS = [(5, 0, False), (12, 0, False), (32, 0, False), (3, 0, False), (14, 4, False), (20, 0, True)]


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


def vocabulary(size: int) -> list[str]:
    tokens: list[str] = []
    for token in SPECIAL_TOKENS + PUNCTUATION + CHARACTERS + ["##" + c for c in CHARACTERS] + WORDS + PIECES:
        if token not in tokens:
            tokens.append(token)
    if len(tokens) > size:
        raise ValueError(f"vocabulary of {len(tokens)} tokens exceeds vocab_size {size}")
    tokens += [f"[unused{index}]" for index in range(size - len(tokens))]
    return tokens


def tokenizer_json(vocab: list[str]) -> str:
    """A BERT WordPiece tokenizer.json, as HuggingFace's BertTokenizerFast saves it."""
    ids = {token: index for index, token in enumerate(vocab)}

    def special(token: str) -> dict:
        return {"id": token, "type_id": 0}

    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": ids[token],
                "content": token,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for token in SPECIAL_TOKENS
        ],
        "normalizer": {
            "type": "BertNormalizer",
            "clean_text": True,
            "handle_chinese_chars": True,
            "strip_accents": None,
            "lowercase": True,
        },
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": special("[CLS]")}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": special("[SEP]")}],
            "pair": [{"SpecialToken": special("[CLS]")}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": special("[SEP]")}, {"Sequence": {"id": "B", "type_id": 1}},
                     {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {
                token: {"id": token, "ids": [ids[token]], "tokens": [token]} for token in ("[CLS]", "[SEP]")
            },
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {
            "type": "WordPiece",
            "unk_token": "[UNK]",
            "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100,
            "vocab": ids,
        },
    }
    return json.dumps(document, indent=1, ensure_ascii=False) + "\n"


def encoder_weights(spec: dict, seed: int) -> dict[str, np.ndarray]:
    """BertModel's tensors under HuggingFace's names, plus the (unused) pooler."""
    rng = np.random.default_rng(seed)
    hidden, inner = spec["hidden"], spec["intermediate"]
    tensors: dict[str, np.ndarray] = {}

    def put(name: str, array: np.ndarray) -> None:
        tensors[name] = array.astype(np.float32)

    def linear(name: str, fan_in: int, fan_out: int, gain: float = 1.0) -> None:
        bound = gain / math.sqrt(fan_in)
        put(f"{name}.weight", rng.uniform(-bound, bound, (fan_out, fan_in)))
        put(f"{name}.bias", rng.uniform(-0.1, 0.1, (fan_out,)))

    def layer_norm(name: str) -> None:
        put(f"{name}.weight", 1.0 + 0.1 * rng.standard_normal(hidden))
        put(f"{name}.bias", 0.1 * rng.standard_normal(hidden))

    put("embeddings.word_embeddings.weight", rng.standard_normal((spec["vocab_size"], hidden)))
    put("embeddings.position_embeddings.weight", 0.5 * rng.standard_normal((spec["max_position"], hidden)))
    put("embeddings.token_type_embeddings.weight", 0.5 * rng.standard_normal((spec["type_vocab_size"], hidden)))
    layer_norm("embeddings.LayerNorm")
    for index in range(spec["layers"]):
        prefix = f"encoder.layer.{index}"
        # Larger query/key weights make attention far from uniform, so the
        # reference exercises it.
        linear(f"{prefix}.attention.self.query", hidden, hidden, gain=3.0)
        linear(f"{prefix}.attention.self.key", hidden, hidden, gain=3.0)
        linear(f"{prefix}.attention.self.value", hidden, hidden)
        linear(f"{prefix}.attention.output.dense", hidden, hidden)
        layer_norm(f"{prefix}.attention.output.LayerNorm")
        linear(f"{prefix}.intermediate.dense", hidden, inner)
        linear(f"{prefix}.output.dense", inner, hidden)
        layer_norm(f"{prefix}.output.LayerNorm")
    # Real checkpoints carry BertModel's pooler head; the encoder ignores it.
    linear("pooler.dense", hidden, hidden)
    return tensors


def encoder_forward(spec: dict, tensors: dict[str, np.ndarray], ids: list[int], mask: list[int]) -> np.ndarray:
    """The reference for one sequence: float64 numpy, no padding, written
    independently of the candle code (separate q/k/v, -inf masking)."""
    t = {name: array.astype(np.float64) for name, array in tensors.items()}
    eps = spec["layer_norm_eps"]
    heads = spec["heads"]
    head_dim = spec["hidden"] // heads
    length = len(ids)
    keep = np.array(mask, dtype=np.float64)

    def layer_norm(x: np.ndarray, name: str) -> np.ndarray:
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * t[f"{name}.weight"] + t[f"{name}.bias"]

    def linear(x: np.ndarray, name: str) -> np.ndarray:
        return x @ t[f"{name}.weight"].T + t[f"{name}.bias"]

    def heads_of(x: np.ndarray) -> np.ndarray:
        return x.reshape(length, heads, head_dim).transpose(1, 0, 2)

    x = (
        t["embeddings.word_embeddings.weight"][np.array(ids)]
        + t["embeddings.position_embeddings.weight"][:length]
        + t["embeddings.token_type_embeddings.weight"][0]
    )
    x = layer_norm(x, "embeddings.LayerNorm")
    for index in range(spec["layers"]):
        prefix = f"encoder.layer.{index}"
        q = heads_of(linear(x, f"{prefix}.attention.self.query"))
        k = heads_of(linear(x, f"{prefix}.attention.self.key"))
        v = heads_of(linear(x, f"{prefix}.attention.self.value"))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(head_dim)
        scores = np.where(keep[None, None, :] > 0, scores, -np.inf)
        weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        weights /= weights.sum(axis=-1, keepdims=True)
        context = (weights @ v).transpose(1, 0, 2).reshape(length, heads * head_dim)
        x = layer_norm(linear(context, f"{prefix}.attention.output.dense") + x, f"{prefix}.attention.output.LayerNorm")
        inner = linear(x, f"{prefix}.intermediate.dense")
        inner = 0.5 * inner * (1.0 + _erf(inner / math.sqrt(2.0)))
        x = layer_norm(linear(inner, f"{prefix}.output.dense") + x, f"{prefix}.output.LayerNorm")
    pooled = (x * keep[:, None]).sum(axis=0) / max(keep.sum(), 1e-9)
    if spec["normalize"]:
        pooled = pooled / max(float(np.sqrt((pooled**2).sum())), 1e-12)
    return pooled


def rounded(values: np.ndarray) -> list[float]:
    # 12 significant digits: far below the tolerances, and immune to the
    # last-bit differences of float64 sums between BLAS builds.
    return [float(f"{v:.12g}") for v in values]


def id_rows(spec: dict, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    rng = np.random.default_rng(seed + 2000)
    vocab = spec["vocab_size"]
    cls, sep = SPECIAL_TOKENS.index("[CLS]"), SPECIAL_TOKENS.index("[SEP]")
    rows, masks = [], []
    for row, (length, padding, hole) in enumerate(ID_ROWS):
        body = [int(v) for v in rng.integers(len(SPECIAL_TOKENS), vocab, length - padding - 2)]
        if row == 1:
            body[0] = vocab - 1  # the largest valid id
        ids = [cls, *body, sep] + [0] * padding
        mask = [1] * (length - padding) + [0] * padding
        if hole:
            mask[length // 2] = 0
        rows.append(ids)
        masks.append(mask)
    return rows, masks


def write_encoders(repository: Path, reference: Path) -> None:
    from tokenizers import Tokenizer  # the PyPI package, pinned in scripts/requirements.txt

    for name, spec, seed in ENCODERS:
        version = repository / name / "1"
        version.mkdir(parents=True)
        (version / "model.json").write_text(json.dumps(spec, indent=2) + "\n")
        tensors = encoder_weights(spec, seed)
        metadata = {SPEC_METADATA_KEY: json.dumps(spec, separators=(",", ":"), sort_keys=True)}
        tolerance = {"abs": 1e-5, "rel": 1e-4}
        if spec["inputs"] == "text":
            text = tokenizer_json(vocabulary(spec["vocab_size"]))
            (version / spec["tokenizer"]).write_text(text)
            metadata[TOKENIZER_METADATA_KEY] = text
            tokenizer = Tokenizer.from_str(text)
            tokenizer.enable_truncation(max_length=spec["max_seq_len"])
            ids = [tokenizer.encode(sentence).ids for sentence in SENTENCES]
            outputs = [encoder_forward(spec, tensors, row, [1] * len(row)) for row in ids]
            document = {
                "model": name,
                "text": SENTENCES,
                "token_ids": ids,
                "embedding": [rounded(row) for row in outputs],
            }
            shape = f"{len(SENTENCES)} sentences, {min(map(len, ids))}..{max(map(len, ids))} tokens"
        else:
            ids, masks = id_rows(spec, seed)
            outputs = [encoder_forward(spec, tensors, row, mask) for row, mask in zip(ids, masks)]
            document = {
                "model": name,
                "input_ids": ids,
                "attention_mask": masks,
                "embedding": [rounded(row) for row in outputs],
            }
            shape = f"{len(ids)} rows of {min(map(len, ids))}..{max(map(len, ids))} tokens"
        write_safetensors(version / "model.safetensors", tensors, metadata)
        document["tolerance"] = tolerance
        # Batched (padded) and unbatched candle answers agree within this.
        document["batch_tolerance"] = 1e-5
        document["computed_by"] = "numpy float64 per sequence, token ids by PyPI tokenizers (models/generate_gpu.py)"
        (reference / f"{name}.json").write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {name}: bert_encoder hidden {spec['hidden']}, {spec['layers']} layers, "
              f"{spec['inputs']}, reference {shape}")


# all-MiniLM-L6-v2's dimensions (HuggingFace config.json of the checkpoint).
MINILM_L6_SPEC = {
    **ENCODER_SPEC,
    "vocab_size": 30522,
    "hidden": 384,
    "layers": 6,
    "heads": 12,
    "intermediate": 1536,
    "max_position": 512,
    "max_seq_len": 256,
    "inputs": "token_ids",
}


def write_minilm_random(directory: Path) -> None:
    """A random-weight encoder of all-MiniLM-L6-v2's size (for benchmarks)."""
    directory.mkdir(parents=True, exist_ok=True)
    spec = MINILM_L6_SPEC
    (directory / "model.json").write_text(json.dumps(spec, indent=2) + "\n")
    tensors = encoder_weights(spec, 20240801)
    metadata = {SPEC_METADATA_KEY: json.dumps(spec, separators=(",", ":"), sort_keys=True)}
    write_safetensors(directory / "model.safetensors", tensors, metadata)
    size = (directory / "model.safetensors").stat().st_size
    print(f"wrote {directory}: random-weight bert_encoder of all-MiniLM-L6-v2's dimensions, {size} bytes")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "gpu")
    parser.add_argument("--minilm-random", type=Path, metavar="DIR",
                        help="write only a random-weight all-MiniLM-L6-v2-sized encoder to DIR")
    args = parser.parse_args()
    if args.minilm_random is not None:
        write_minilm_random(args.minilm_random)
        return 0
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
                    "output": [rounded(row) for row in y],
                    "tolerance": {"abs": 1e-5, "rel": 1e-4},
                    "computed_by": "numpy float64 (models/generate_gpu.py)",
                },
                indent=1,
            )
            + "\n"
        )
        print(f"wrote {name}: {spec['input_dim']}->{spec['hidden']}->{spec['output_dim']} "
              f"{spec['activation']}/{spec['output']}, reference {x.shape} -> {y.shape}")

    write_encoders(repository, reference)

    total = sum(path.stat().st_size for path in args.out.rglob("*") if path.is_file())
    print(f"total size: {total} bytes")
    if total > 512 * 1024:
        print("fixtures grew past 512 KiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
