"""KV cache: managers (rank-0 accounting of pages and the prefix tree) and backends (each rank's KV
tensors and attention kernels). Backends register in nanoslg.core.registry.CACHE_BACKENDS."""
