"""Score Spark DataFrames with models served by Shamal.

`score(df, model, inputs, ...)` returns the key columns plus one column per
model output, computed with `df.mapInPandas` through the router's KServe v2
gRPC API; `predict_udf(model, ...)` returns a pandas UDF for one output.
Both send the bearer token, tenant and allowed regions the router reads
(`authorization`, `x-shamal-tenant`, `x-shamal-allowed-regions`), retry
RESOURCE_EXHAUSTED and UNAVAILABLE with backoff, and raise ShamalError
(model and gRPC code) or SchemaError (the column) otherwise.
"""

from ._client import RETRYABLE_CODES, Connection, ModelInfo, SchemaError, ShamalError, Tensor
from ._spark import predict_udf, score

__all__ = ["score", "predict_udf", "ShamalError", "SchemaError", "Connection", "ModelInfo", "Tensor",
           "RETRYABLE_CODES"]
__version__ = "0.1.0"
