"""Scheduling: the batcher and the admission policies. Importing registers the policies."""
from nanoslg.scheduler import policies_cache, policy  # noqa: F401
