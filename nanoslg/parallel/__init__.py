"""Parallel strategies (single, tp, pp, hybrid): executors behind one protocol, process groups, the
worker loop. Strategies register in nanoslg.core.registry.PARALLEL."""
