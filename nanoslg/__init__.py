"""NanoSLG: a small, readable, correct LLM inference server.

`LLM` and `SamplingParams` load lazily, so importing a light part of the package (the HTTP server's
protocol, say) does not import torch.
"""

__all__ = ["LLM", "SamplingParams", "StructuredOutputs", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":
        from nanoslg.llm import LLM

        return LLM
    if name in ("SamplingParams", "StructuredOutputs"):
        from nanoslg.core import sampling_params

        return getattr(sampling_params, name)
    if name in ("RequestOutput", "CompletionOutput"):
        from nanoslg.engine import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module 'nanoslg' has no attribute {name!r}")
