"""Model layer: config parsing, layers, architectures (registered on import), loading, sampling."""
from nanoslg.model import llama  # noqa: F401  (registers the architectures)
from nanoslg.model.hf_config import ModelArgs, load_args, shape_path
from nanoslg.model.loader import load_model
from nanoslg.model.sampler import Sampler

__all__ = ["ModelArgs", "load_args", "shape_path", "load_model", "Sampler"]
