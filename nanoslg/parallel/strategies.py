"""Importing this registers every parallel strategy in nanoslg.registry.PARALLEL."""
from nanoslg.parallel import multi, single  # noqa: F401
