"""Scheduling: the batcher and the admission policies. Importing registers the policies."""
from nanoslg.scheduler import policy  # noqa: F401

try:  # cache-aware policies (lpm, dfs-weight, random)
    from nanoslg.scheduler import policies_cache  # noqa: F401
except ImportError:  # pragma: no cover
    pass
