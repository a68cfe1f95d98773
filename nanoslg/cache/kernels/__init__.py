"""GPU kernels of the cache backends (Triton). Imported only when a backend picks one, so CPU installs
never import Triton."""
