"""KV cache: managers (rank-0 accounting) and backends (per-rank tensors). Importing registers them."""
from nanoslg.cache import flashinfer_backend, paged_torch, sdpa  # noqa: F401  (flashinfer loads lazily)
