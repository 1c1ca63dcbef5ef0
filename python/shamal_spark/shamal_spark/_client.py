"""The gRPC side of shamal_spark: connection settings, headers, retries,
errors and the model's metadata. Nothing here imports pyspark, so executors
and tests can use it on its own."""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Callable, Optional, Sequence, Tuple, TypeVar, Union

# Overload and a worker or router briefly gone: worth another try. Every
# other code (NOT_FOUND, INVALID_ARGUMENT, PERMISSION_DENIED,
# FAILED_PRECONDITION from residency, ...) would fail the same way again.
RETRYABLE_CODES = frozenset({"RESOURCE_EXHAUSTED", "UNAVAILABLE"})

# The gRPC metadata the router reads (services/router/src/residency.rs,
# docs/security.md).
AUTHORIZATION_HEADER = "authorization"
TENANT_HEADER = "x-shamal-tenant"
REGIONS_HEADER = "x-shamal-allowed-regions"

T = TypeVar("T")


class ShamalError(Exception):
    """A call to the router failed. Names the model, the gRPC status code
    (``code``, e.g. ``"FAILED_PRECONDITION"``) and the router's message."""

    def __init__(self, model: str, code: str, message: str, version: Optional[str] = None):
        self.model = model
        self.code = code
        self.details = message
        self.version = version
        where = f"model '{model}'" + (f" version {version}" if version else "")
        super().__init__(f"{where}: {code}: {message}")

    def __reduce__(self):
        # Keeps the fields when the exception crosses a process boundary.
        return (type(self), (self.model, self.code, self.details, self.version))


class SchemaError(ValueError):
    """The DataFrame does not fit the model: names the column and the model
    input (or output) concerned. Raised before any Spark job starts."""


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: Tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    name: str
    versions: Tuple[str, ...]
    inputs: Tuple[Tensor, ...]
    outputs: Tuple[Tensor, ...]
    # From ModelConfig; None when the router did not say.
    max_batch_size: Optional[int]


def _status_code(error) -> str:
    status = error.status() if hasattr(error, "status") else None
    if not status:
        return "UNKNOWN"
    return str(status).rsplit(".", 1)[-1]


def normalize_regions(regions: Union[None, str, Sequence[str]]) -> Optional[Tuple[str, ...]]:
    if regions is None:
        return None
    if isinstance(regions, str):
        items = [r.strip() for r in regions.split(",")]
    else:
        items = [str(r).strip() for r in regions]
        if any("," in r for r in items):
            raise ValueError(f"regions: a region name cannot contain ',' (got {list(regions)!r})")
    items = [r for r in items if r]
    if not items:
        raise ValueError("regions: empty list (leave it out to let the router apply the other policies)")
    return tuple(items)


@dataclasses.dataclass(frozen=True)
class Connection:
    """How to reach the router and what to send with every call. Pickled
    into each Spark task; holds the token file's path, not its content, so a
    rotated token is picked up by the next partition."""

    url: str
    model: str
    version: Optional[str] = None
    token: Optional[str] = None
    token_file: Optional[str] = None
    tenant: Optional[str] = None
    regions: Optional[Tuple[str, ...]] = None
    timeout_s: float = 60.0
    retries: int = 5
    tls: bool = False
    root_certificates: Optional[str] = None
    backoff_s: float = 0.2
    max_backoff_s: float = 10.0

    def __post_init__(self):
        if not self.url:
            raise ValueError("url: the router's gRPC address (host:port) is required")
        if self.token is not None and self.token_file is not None:
            raise ValueError("give token or token_file, not both")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0 (got {self.retries})")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 (got {self.timeout_s})")

    def __repr__(self):
        # Never print the token.
        token = "<set>" if self.token else None
        return (f"Connection(url={self.url!r}, model={self.model!r}, version={self.version!r}, "
                f"token={token}, token_file={self.token_file!r}, tenant={self.tenant!r}, "
                f"regions={self.regions!r}, tls={self.tls})")

    def read_token(self) -> Optional[str]:
        if self.token_file is None:
            return self.token or None
        try:
            with open(self.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise ValueError(f"token_file {self.token_file!r} cannot be read: {e}") from e
        if not token:
            raise ValueError(f"token_file {self.token_file!r} is empty")
        return token

    def headers(self) -> dict:
        """The gRPC metadata of every call: bearer token, tenant, regions.
        Reads token_file anew on each call."""
        headers = {}
        token = self.read_token()
        if token:
            headers[AUTHORIZATION_HEADER] = f"Bearer {token}"
        if self.tenant:
            headers[TENANT_HEADER] = self.tenant
        if self.regions:
            headers[REGIONS_HEADER] = ",".join(self.regions)
        return headers

    def client(self):
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(
            self.url, ssl=self.tls, root_certificates=self.root_certificates)

    def call(self, what: str, fn: Callable[[], T], sleep: Callable[[float], None] = time.sleep) -> T:
        """Runs one gRPC call, retrying RESOURCE_EXHAUSTED and UNAVAILABLE up
        to `retries` times with exponential backoff and jitter; any other
        failure, or the last one, raises ShamalError."""
        from tritonclient.utils import InferenceServerException

        attempt = 0
        while True:
            try:
                return fn()
            except InferenceServerException as e:
                code = _status_code(e)
                if code in RETRYABLE_CODES and attempt < self.retries:
                    delay = min(self.max_backoff_s, self.backoff_s * (2 ** attempt))
                    sleep(delay * random.uniform(0.5, 1.0))
                    attempt += 1
                    continue
                message = e.message() if hasattr(e, "message") else str(e)
                if attempt:
                    message = f"{message} (gave up after {attempt} retries)"
                raise ShamalError(self.model, code, f"{what}: {message}", self.version) from e

    def model_info(self) -> ModelInfo:
        """ModelMetadata (names, datatypes, shapes) and ModelConfig's
        max_batch_size, with this connection's headers."""
        client = self.client()
        try:
            headers = self.headers()
            md = self.call("ModelMetadata", lambda: client.get_model_metadata(
                self.model, self.version or "", headers=headers, client_timeout=self.timeout_s))
            max_batch_size = None
            try:
                cfg = self.call("ModelConfig", lambda: client.get_model_config(
                    self.model, self.version or "", headers=headers, client_timeout=self.timeout_s))
                max_batch_size = int(cfg.config.max_batch_size)
            except ShamalError:
                # Metadata answered, so the model is there: a router that
                # does not serve ModelConfig only costs us the batch cap.
                max_batch_size = None
        finally:
            client.close()
        return ModelInfo(
            name=md.name,
            versions=tuple(md.versions),
            inputs=tuple(Tensor(t.name, t.datatype, tuple(int(d) for d in t.shape)) for t in md.inputs),
            outputs=tuple(Tensor(t.name, t.datatype, tuple(int(d) for d in t.shape)) for t in md.outputs),
            max_batch_size=max_batch_size,
        )
