"""Quantized linear layers: one file per method, each registering itself in
nanoslg.core.registry.QUANTIZATION (`model.quantization=fp8|awq`); base.py is the seam the layers call."""
