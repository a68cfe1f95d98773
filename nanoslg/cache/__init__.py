"""KV cache: managers (rank-0 accounting) and backends (per-rank tensors). Importing registers them."""
from nanoslg.cache import sdpa  # noqa: F401

try:  # written alongside; optional until present
    from nanoslg.cache import paged_torch  # noqa: F401
except ImportError:  # pragma: no cover
    pass
try:
    from nanoslg.cache import flashinfer_backend  # noqa: F401  (imports flashinfer lazily)
except ImportError:  # pragma: no cover
    pass
