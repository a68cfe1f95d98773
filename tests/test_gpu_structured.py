"""Structured outputs on the GPU (skipped without CUDA): the property test of test_structured.py on the
demo model with FlashInfer, decode CUDA graphs and overlap scheduling (sampling runs outside the
graph; constrained rows get their masks after the step in flight), greedy and sampled, with the
fused sampling kernel where it runs."""

import pytest
import torch
from structured_cases import run_property

from nanoslg import LLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("sampling", ["auto", "torch"])
def test_every_stopped_completion_validates_on_the_device(demo_model, sampling):
    with LLM(
        f"model.path={demo_model}", "model.device=cuda", "cache=flashinfer", f"model.sampling_kernels={sampling}"
    ) as llm:
        info = llm.engine.info
        assert info["cuda_graphs"] and info["overlap"] and info["cache_backend"] == "flashinfer", info
        counts = run_property(llm, seed=21, n_schemas=150)
    total = sum(counts.values())
    assert counts.get("stop", 0) >= total * 0.6, counts
    assert set(counts) <= {"stop", "length"}, counts
