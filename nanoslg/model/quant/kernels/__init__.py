"""GPU kernels of the quantization methods (Triton, torch._scaled_mm). Imported only when a method picks
a GPU kernel, so CPU installs never import Triton; each has a plain-torch twin in its method's file."""
