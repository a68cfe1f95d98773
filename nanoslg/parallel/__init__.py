"""Parallel strategies (single, tp, pp, hybrid). Importing registers them."""
from nanoslg.parallel import multi, single  # noqa: F401
