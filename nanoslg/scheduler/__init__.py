"""Scheduling: the batcher (scheduler.py) and the admission policies (policy.py, policies_cache.py).

Kept import-free, since the cache layer imports scheduler.plan; `register_all()` loads the policies.
"""


def register_all() -> None:
    from nanoslg.scheduler import policies_cache, policy  # noqa: F401
