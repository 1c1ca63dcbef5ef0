"""Spark side of shamal_spark: checks a DataFrame's schema against the
model's metadata, converts pandas batches to v2 tensors and back, and runs
the calls from `mapInPandas` (score) or a pandas UDF (predict_udf)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Iterator, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from ._client import Connection, ModelInfo, SchemaError, Tensor, normalize_regions

_FLOAT = frozenset({"FP16", "FP32", "FP64"})
_INT = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})
_NUMPY = {
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "BOOL": np.bool_, "BYTES": np.object_,
}
# numpy type a model output is converted to before Arrow sees it (Spark has
# no unsigned or half types: each goes to the next wider signed/float one).
_OUT_NUMPY = {
    "FP16": np.float32, "FP32": np.float32, "FP64": np.float64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.int16, "UINT16": np.int32, "UINT32": np.int64, "UINT64": np.int64,
    "BOOL": np.bool_,
}


def _spark_out_type(datatype: str):
    from pyspark.sql import types as T

    return {
        "FP16": T.FloatType(), "FP32": T.FloatType(), "FP64": T.DoubleType(),
        "INT8": T.ByteType(), "INT16": T.ShortType(), "INT32": T.IntegerType(), "INT64": T.LongType(),
        "UINT8": T.ShortType(), "UINT16": T.IntegerType(), "UINT32": T.LongType(), "UINT64": T.LongType(),
        "BOOL": T.BooleanType(), "BYTES": T.StringType(),
    }[datatype]


# ------------------------------------------------------------------ plan

@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str           # model input
    datatype: str
    row_shape: Tuple[int, ...]  # shape without the batch dimension
    column: str         # DataFrame column (or UDF argument label)

    @property
    def vector(self) -> bool:
        return len(self.row_shape) == 1 and self.row_shape != (1,)


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    name: str
    datatype: str
    row_shape: Tuple[int, ...]
    column: str

    @property
    def scalar(self) -> bool:
        return self.row_shape in ((), (1,))


@dataclasses.dataclass(frozen=True)
class Plan:
    inputs: Tuple[InputSpec, ...]
    outputs: Tuple[OutputSpec, ...]
    keys: Tuple[str, ...]
    batch_size: int


def _row_shape(model: str, tensor: Tensor, kind: str, max_batch_size: Optional[int]) -> Tuple[int, ...]:
    if max_batch_size == 0 or not tensor.shape or tensor.shape[0] != -1:
        raise SchemaError(
            f"model '{model}' {kind} '{tensor.name}' has shape {list(tensor.shape)}, without a batch "
            "dimension: score() sends many rows per request and needs a model that batches "
            "(max_batch_size > 0)")
    return tuple(tensor.shape[1:])


def _expected(spec: InputSpec) -> str:
    if spec.datatype == "BYTES":
        what = "string (or binary)"
    elif spec.datatype == "BOOL":
        what = "boolean"
    elif spec.datatype in _INT:
        what = "integer"
    else:
        what = "numeric"
    if spec.vector:
        n = spec.row_shape[0]
        return f"an array<{what}> column" + (f" of {n} elements" if n > 0 else "")
    return f"a {what} column"


def _accepts(spec: InputSpec, spark_type) -> bool:
    from pyspark.sql import types as T

    if spec.vector:
        if not isinstance(spark_type, T.ArrayType):
            return False
        spark_type = spark_type.elementType
    elif isinstance(spark_type, T.ArrayType):
        return False
    ints = (T.ByteType, T.ShortType, T.IntegerType, T.LongType)
    if spec.datatype in _FLOAT:
        return isinstance(spark_type, ints + (T.FloatType, T.DoubleType))
    if spec.datatype in _INT:
        return isinstance(spark_type, ints)
    if spec.datatype == "BOOL":
        return isinstance(spark_type, T.BooleanType)
    if spec.datatype == "BYTES":
        return isinstance(spark_type, (T.StringType, T.BinaryType))
    return False


def _resolve_inputs(model: str, info: ModelInfo, inputs) -> Sequence[Tuple[Tensor, str]]:
    names = [t.name for t in info.inputs]
    by_name = {t.name: t for t in info.inputs}
    if inputs is None:
        return [(t, t.name) for t in info.inputs]
    if isinstance(inputs, str):
        if len(info.inputs) != 1:
            raise SchemaError(f"model '{model}' has {len(names)} inputs {names}: give inputs as a "
                              "mapping {model input: column} or a list of columns in that order")
        return [(info.inputs[0], inputs)]
    if isinstance(inputs, Mapping):
        unknown = [n for n in inputs if n not in by_name]
        if unknown:
            raise SchemaError(f"model '{model}' has no input {unknown[0]!r} (its inputs: {names})")
        missing = [n for n in names if n not in inputs]
        if missing:
            raise SchemaError(f"model '{model}' input {missing[0]!r} is not given a column (inputs: {names})")
        return [(by_name[n], inputs[n]) for n in names]
    columns = list(inputs)
    if len(columns) != len(names):
        raise SchemaError(f"model '{model}' has {len(names)} inputs {names}, got {len(columns)} columns {columns}")
    return list(zip(info.inputs, columns))


def _resolve_outputs(model: str, info: ModelInfo, outputs) -> Sequence[Tuple[Tensor, str]]:
    names = [t.name for t in info.outputs]
    by_name = {t.name: t for t in info.outputs}
    if outputs is None:
        return [(t, t.name) for t in info.outputs]
    if isinstance(outputs, str):
        outputs = [outputs]
    pairs = list(outputs.items()) if isinstance(outputs, Mapping) else [(o, o) for o in outputs]
    for name, _ in pairs:
        if name not in by_name:
            raise SchemaError(f"model '{model}' has no output {name!r} (its outputs: {names})")
    if not pairs:
        raise SchemaError(f"outputs: no output of model '{model}' asked for (its outputs: {names})")
    return [(by_name[n], c) for n, c in pairs]


def _effective_batch_size(batch_size: int, info: ModelInfo) -> int:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    if info.max_batch_size and info.max_batch_size > 0:
        return min(batch_size, info.max_batch_size)
    return batch_size


def plan_for(schema, model: str, info: ModelInfo, inputs, outputs, keys, batch_size: int) -> Plan:
    """Checks the DataFrame's schema against the model; raises SchemaError
    naming the column otherwise."""
    fields = {f.name: f for f in schema.fields}
    available = ", ".join(fields) or "none"
    specs = []
    for tensor, column in _resolve_inputs(model, info, inputs):
        spec = InputSpec(tensor.name, tensor.datatype, _row_shape(model, tensor, "input", info.max_batch_size),
                         column)
        if len(spec.row_shape) > 1:
            raise SchemaError(f"model '{model}' input '{tensor.name}' has shape {list(tensor.shape)}: "
                              "only scalar and vector inputs can be read from a column")
        if spec.datatype not in _NUMPY:
            raise SchemaError(f"model '{model}' input '{tensor.name}' has datatype {spec.datatype}, "
                              "which no Spark column maps to")
        if column not in fields:
            raise SchemaError(f"column '{column}' (model '{model}' input '{tensor.name}') is not in the "
                              f"DataFrame (its columns: {available})")
        if not _accepts(spec, fields[column].dataType):
            raise SchemaError(
                f"column '{column}' is {fields[column].dataType.simpleString()}, but model '{model}' input "
                f"'{tensor.name}' ({spec.datatype} {list(tensor.shape)}) needs {_expected(spec)}")
        specs.append(spec)
    keys = tuple(keys)
    for key in keys:
        if key not in fields:
            raise SchemaError(f"key column '{key}' is not in the DataFrame (its columns: {available})")
    outs = []
    for tensor, column in _resolve_outputs(model, info, outputs):
        if tensor.datatype not in _NUMPY:
            raise SchemaError(f"model '{model}' output '{tensor.name}' has datatype {tensor.datatype}, "
                              "which no Spark column maps to")
        if column in keys or column in [o.column for o in outs]:
            raise SchemaError(f"output column '{column}' (model '{model}' output '{tensor.name}') "
                              "clashes with a key or another output column")
        outs.append(OutputSpec(tensor.name, tensor.datatype,
                               _row_shape(model, tensor, "output", info.max_batch_size), column))
    return Plan(tuple(specs), tuple(outs), keys, _effective_batch_size(batch_size, info))


def output_type(spec: OutputSpec):
    from pyspark.sql import types as T

    t = _spark_out_type(spec.datatype)
    if spec.scalar:
        return t
    for _ in spec.row_shape:
        t = T.ArrayType(t, containsNull=False)
    return t


def output_schema(schema, plan: Plan):
    from pyspark.sql import types as T

    fields = {f.name: f for f in schema.fields}
    return T.StructType([fields[k] for k in plan.keys] +
                        [T.StructField(o.column, output_type(o), nullable=False) for o in plan.outputs])


# ------------------------------------------------------------ conversion

def _to_bytes(value, column: str):
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise SchemaError(f"column '{column}': expected strings, got {type(value).__name__}")


def _cast_numbers(values: np.ndarray, spec: InputSpec) -> np.ndarray:
    target = _NUMPY[spec.datatype]
    if spec.datatype in _INT and values.size and np.issubdtype(values.dtype, np.integer):
        info = np.iinfo(target)
        lo, hi = values.min(), values.max()
        if lo < info.min or hi > info.max:
            raise SchemaError(f"column '{spec.column}' has values in [{lo}, {hi}], outside model input "
                              f"'{spec.name}' ({spec.datatype})")
    return values.astype(target, copy=False)


def input_array(spec: InputSpec, series: pd.Series) -> np.ndarray:
    """One batch of one column as the model input's tensor."""
    n = len(series)
    nulls = int(series.isna().sum())
    if nulls:
        raise SchemaError(f"column '{spec.column}' (model input '{spec.name}') has {nulls} null value(s) "
                          "in this batch: filter or fill them before scoring")
    if not spec.vector:
        if spec.datatype == "BYTES":
            arr = np.array([_to_bytes(v, spec.column) for v in series], dtype=np.object_)
        else:
            arr = _cast_numbers(series.to_numpy(), spec)
        return arr.reshape((n,) + spec.row_shape)
    rows = series.to_numpy()
    lengths = {len(r) for r in rows}
    want = spec.row_shape[0]
    bad = sorted(length for length in lengths if want > 0 and length != want)
    if bad or len(lengths) > 1:
        raise SchemaError(
            f"column '{spec.column}' has arrays of length {sorted(lengths)} in one batch, model input "
            f"'{spec.name}' needs " + (f"{want} elements per row" if want > 0 else "one length per batch"))
    width = lengths.pop() if lengths else max(want, 0)
    if spec.datatype == "BYTES":
        arr = np.array([[_to_bytes(v, spec.column) for v in r] for r in rows], dtype=np.object_)
        return arr.reshape(n, width)
    if n == 0:
        return np.zeros((0, width), dtype=_NUMPY[spec.datatype])
    return _cast_numbers(np.stack([np.asarray(r) for r in rows]), spec)


def output_series(spec: OutputSpec, arr: np.ndarray, n: int, model: str) -> pd.Series:
    if arr is None:
        raise SchemaError(f"model '{model}' returned no output '{spec.name}'")
    if arr.ndim == 0 or arr.shape[0] != n:
        raise SchemaError(f"model '{model}' output '{spec.name}' has shape {list(arr.shape)} for {n} rows")
    if spec.datatype == "BYTES":
        decode = np.vectorize(lambda b: b.decode("utf-8") if isinstance(b, bytes) else str(b), otypes=[object])
        arr = decode(arr) if arr.size else arr
        if spec.scalar:
            return pd.Series(arr.reshape(n), dtype=object)
        return pd.Series(arr.tolist(), dtype=object)
    arr = arr.astype(_OUT_NUMPY[spec.datatype], copy=False)
    if spec.scalar:
        return pd.Series(arr.reshape(n))
    if arr.ndim == 2:
        return pd.Series(list(arr), dtype=object)
    return pd.Series(arr.tolist(), dtype=object)


def infer_batch(client, conn: Connection, plan: Plan, columns: Sequence[pd.Series], headers) -> list:
    """One ModelInfer for one batch; returns one Series per plan output."""
    import tritonclient.grpc as grpcclient

    n = len(columns[0]) if columns else 0
    tensors = []
    for spec, series in zip(plan.inputs, columns):
        arr = input_array(spec, series)
        t = grpcclient.InferInput(spec.name, list(arr.shape), spec.datatype)
        t.set_data_from_numpy(arr)
        tensors.append(t)
    requested = [grpcclient.InferRequestedOutput(o.name) for o in plan.outputs]
    result = conn.call("ModelInfer", lambda: client.infer(
        conn.model, tensors, model_version=conn.version or "", outputs=requested,
        headers=headers, client_timeout=conn.timeout_s))
    return [output_series(o, result.as_numpy(o.name), n, conn.model) for o in plan.outputs]


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def _score_partition(conn: Connection, plan: Plan):
    def run(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        client = conn.client()
        try:
            headers = conn.headers()  # the token file is read once per partition
            for frame in frames:
                if len(frame) == 0:
                    continue
                frame = frame.reset_index(drop=True)
                pieces = [[] for _ in plan.outputs]
                for start, end in _batches(len(frame), plan.batch_size):
                    part = frame.iloc[start:end]
                    for acc, series in zip(pieces, infer_batch(
                            client, conn, plan, [part[s.column] for s in plan.inputs], headers)):
                        acc.append(series)
                out = {k: frame[k] for k in plan.keys}
                for spec, acc in zip(plan.outputs, pieces):
                    out[spec.column] = pd.concat(acc, ignore_index=True)
                yield pd.DataFrame(out)
        finally:
            client.close()

    return run


# ------------------------------------------------------------ public API

def _connection(model, url, version, token, token_file, tenant, regions, timeout_s, retries, tls,
                root_certificates) -> Connection:
    return Connection(url=url, model=model, version=None if version is None else str(version),
                      token=token, token_file=token_file, tenant=tenant, regions=normalize_regions(regions),
                      timeout_s=float(timeout_s), retries=int(retries), tls=bool(tls),
                      root_certificates=root_certificates)


def score(df, model: str, inputs: Union[None, str, Sequence[str], Mapping[str, str]] = None,
          outputs: Union[None, str, Sequence[str], Mapping[str, str]] = None, *, url: str,
          version: Union[None, int, str] = None, batch_size: int = 1024, keys: Sequence[str] = (),
          token: Optional[str] = None, token_file: Optional[str] = None, tenant: Optional[str] = None,
          regions: Union[None, str, Sequence[str]] = None, timeout_s: float = 60.0, retries: int = 5,
          tls: bool = False, root_certificates: Optional[str] = None):
    """Scores `df` with `model` through the router's v2 gRPC API.

    Returns a DataFrame of the `keys` columns followed by one column per
    model output (all outputs, or those named in `outputs`), computed with
    `df.mapInPandas`: each partition opens one gRPC client and sends its rows
    `batch_size` at a time (capped at the model's max_batch_size), one
    ModelInfer per batch. Lazy like any transformation: nothing is scored
    until an action runs.

    `inputs` maps the model's inputs to columns: None (columns named like
    the inputs), a column name (single-input models), a list of columns in
    the model's input order, or a dict {model input: column}. `outputs`:
    None (all), a name, a list of names, or a dict {model output: column}.

    Before returning, reads the model's metadata from the router (with the
    same token and headers) and checks the schema: SchemaError names the
    column that is missing or of the wrong type; ShamalError names the model
    and the gRPC code (NOT_FOUND for an unknown model or version,
    PERMISSION_DENIED, ...). Errors during the job (residency
    FAILED_PRECONDITION, RESOURCE_EXHAUSTED after `retries` retries, ...)
    fail the Spark job with the same ShamalError message.
    """
    conn = _connection(model, url, version, token, token_file, tenant, regions, timeout_s, retries, tls,
                       root_certificates)
    info = conn.model_info()
    plan = plan_for(df.schema, model, info, inputs, outputs, keys, batch_size)
    return df.mapInPandas(_score_partition(conn, plan), output_schema(df.schema, plan))


def predict_udf(model: str, *, url: str, output: Optional[str] = None, version: Union[None, int, str] = None,
                batch_size: int = 1024, token: Optional[str] = None, token_file: Optional[str] = None,
                tenant: Optional[str] = None, regions: Union[None, str, Sequence[str]] = None,
                timeout_s: float = 60.0, retries: int = 5, tls: bool = False,
                root_certificates: Optional[str] = None):
    """A pandas UDF for one model output: `df.withColumn("score", udf(*cols))`
    with one column per model input, in the model's input order. `output`
    may be left out for single-output models. The model's metadata is read
    here (errors raise here); column types are checked when the job runs
    (SchemaError naming the model input), since a UDF does not see the
    DataFrame's schema. One gRPC client per partition, `batch_size` rows per
    ModelInfer, like score()."""
    from pyspark.sql.functions import pandas_udf

    conn = _connection(model, url, version, token, token_file, tenant, regions, timeout_s, retries, tls,
                       root_certificates)
    info = conn.model_info()
    names = [t.name for t in info.outputs]
    if output is None:
        if len(names) != 1:
            raise SchemaError(f"model '{model}' has outputs {names}: name the one this UDF returns (output=)")
        output = names[0]
    specs = []
    for tensor in info.inputs:
        spec = InputSpec(tensor.name, tensor.datatype, _row_shape(model, tensor, "input", info.max_batch_size),
                         f"argument for model input '{tensor.name}'")
        if len(spec.row_shape) > 1 or spec.datatype not in _NUMPY:
            raise SchemaError(f"model '{model}' input '{tensor.name}' ({tensor.datatype} "
                              f"{list(tensor.shape)}) cannot be read from a column")
        specs.append(spec)
    (tensor, column), = _resolve_outputs(model, info, [output])
    out = OutputSpec(tensor.name, tensor.datatype, _row_shape(model, tensor, "output", info.max_batch_size), column)
    plan = Plan(tuple(specs), (out,), (), _effective_batch_size(batch_size, info))
    arity = len(specs)

    def run(batches):
        client = conn.client()
        try:
            headers = conn.headers()
            for batch in batches:
                columns = [batch] if arity == 1 else list(batch)
                columns = [c.reset_index(drop=True) for c in columns]
                n = len(columns[0])
                pieces = [infer_batch(client, conn, plan, [c.iloc[s:e] for c in columns], headers)[0]
                          for s, e in _batches(n, plan.batch_size)]
                yield pd.concat(pieces, ignore_index=True) if pieces else pd.Series([], dtype=object)
        finally:
            client.close()

    arg = pd.Series if arity == 1 else typing.Tuple[tuple([pd.Series] * arity)]
    run.__annotations__ = {"batches": typing.Iterator[arg], "return": typing.Iterator[pd.Series]}
    udf = pandas_udf(run, output_type(out))

    def call(*cols):
        if len(cols) != arity:
            raise SchemaError(f"model '{model}' has {arity} inputs {[s.name for s in specs]}: "
                              f"the UDF takes {arity} column(s), got {len(cols)}")
        return udf(*cols)

    call.__name__ = f"shamal_{model}_{out.name}"
    call.udf = udf
    return call
