"""Parallel strategies (single, tp, pp, hybrid), process groups, the worker loop.

Kept import-free: the model layers read `parallel.state`, and importing every strategy here would
pull the model loader back in while it is being imported. `strategies` registers them all.
"""
