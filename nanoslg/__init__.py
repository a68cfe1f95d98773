"""NanoSLG: a small, readable, correct LLM inference server."""
from nanoslg.engine.outputs import CompletionOutput, RequestOutput
from nanoslg.engine.sampling_params import SamplingParams
from nanoslg.llm import LLM

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
