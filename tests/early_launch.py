"""The check both early-launch GPU tests make (test_rope_append.py, test_fused_decode.py): a step that
runs the FP8 skinny kernel and then a kernel reading its output, launched as programmatic dependents on
SM90, gives the bits of the same kernels run one at a time, eagerly and replayed from a CUDA graph."""

from __future__ import annotations

import torch


def assert_early_launch_reads_its_input(step, pool: torch.Tensor, modules, monkeypatch) -> None:
    """step(pool, sync=False) runs the chain on a copy of the KV pool and returns its output; with
    sync=True it synchronizes between the kernels. modules: those whose `pdl_ok` decides the launch."""
    from nanoslg.core.pdl import pdl_ok

    assert pdl_ok(pool.device) == (torch.cuda.get_device_capability() >= (9, 0))  # on SM90 the path under test
    got_pool, graph_pool = pool.clone(), pool.clone()
    got = step(got_pool)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = step(graph_pool)
    graph_pool.copy_(pool)
    graph.replay()
    torch.cuda.synchronize()
    for module in modules:
        monkeypatch.setattr(module, "pdl_ok", lambda device: False)
    want_pool = pool.clone()
    want = step(want_pool, sync=True)  # one at a time, nothing launched early
    assert not torch.equal(want_pool, pool)  # the step appended
    assert torch.equal(got, want) and torch.equal(got_pool, want_pool)
    assert torch.equal(replayed, want) and torch.equal(graph_pool, want_pool)
