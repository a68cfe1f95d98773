"""Scheduling: the batcher (scheduler.py) and the admission policies (policy.py, policies_cache.py),
which register in nanoslg.core.registry.SCHEDULERS."""
