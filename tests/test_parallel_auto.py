"""parallel=auto: the choice over a table of (model, GPUs, memory), and on this CPU machine."""

from __future__ import annotations

import pytest

from nanoslg.core.errors import ConfigError
from nanoslg.parallel.auto import Machine, ModelNeeds, choose, resolve_parallel

GiB = 2**30


def model(weights_gib: float, kv_kib_per_token: float, ctx: int, layers=32, heads=32, kv_heads=8, inter=14336):
    return ModelNeeds(int(weights_gib * GiB), int(kv_kib_per_token * 1024), ctx, layers, heads, kv_heads, inter)


LLAMA3_8B = model(15.0, 128, 8192)  # bf16: 8.0e9 params; KV 2 x 32 layers x 8 heads x 128 x 2 bytes
LLAMA3_70B = model(131.0, 320, 32768, layers=80, heads=64, inter=28672)
ODD_HEADS = model(60.0, 64, 4096, layers=30, heads=6, kv_heads=2, inter=12000)  # 6 heads: tp 4 cannot split
# usable memory at cache.gpu_memory_utilization=0.9
H100, L4, T4 = int(80 * 0.9 * GiB), int(24 * 0.9 * GiB), int(16 * 0.9 * GiB)


@pytest.mark.parametrize(
    "needs, machine, expect",
    [
        (LLAMA3_8B, Machine(gpus=0), ("single", 1, 1)),  # the CPU
        (LLAMA3_8B, Machine(1, H100), ("single", 1, 1)),
        (LLAMA3_8B, Machine(8, H100), ("single", 1, 1)),  # fits one: no more GPUs than it needs
        (LLAMA3_8B, Machine(4, T4), ("tp", 2, 1)),  # 15 GiB of weights on 16 GB cards: two
        (LLAMA3_70B, Machine(8, H100), ("tp", 4, 1)),  # 131 + 10 GiB: three would hold it, tp needs 4
        (ODD_HEADS, Machine(4, L4), ("hybrid", 2, 2)),  # four GPUs, but tp=4 does not split 6 heads
        (ODD_HEADS, Machine(3, int(31 * GiB)), ("pp", 1, 3)),  # three: tp=3 does not split 2 KV heads
        (LLAMA3_70B, Machine(8, H100, nodes=2, world=16), ("hybrid", 8, 2)),  # torchrun: tp in a node
        (LLAMA3_8B, Machine(1, H100, nodes=2, world=2), ("pp", 1, 2)),  # one GPU per node: stages
        (LLAMA3_8B, Machine(4, H100, nodes=1, world=4), ("tp", 4, 1)),  # every rank torchrun started
    ],
)
def test_choice_table(needs, machine, expect):
    c = choose(needs, machine)
    assert (c.mode, c.tp, c.pp) == expect, c.why
    assert c.why


def test_too_big_for_every_gpu_says_what_it_needs():
    with pytest.raises(ConfigError, match=r"parallel=auto: the model needs 141\.0 GiB .* lower model\.max_model_len"):
        choose(LLAMA3_70B, Machine(2, H100))


def test_auto_is_the_default_and_picks_single_on_cpu(tiny_llama, caplog):
    import logging

    from nanoslg.core.compose import compose_config
    from nanoslg.model.checkpoint import resolve_checkpoint

    cfg, _ = compose_config([f"model.path={tiny_llama}"])
    assert cfg.parallel.mode == "auto"
    with caplog.at_level(logging.INFO, logger="nanoslg.parallel"):
        got = resolve_parallel(cfg, resolve_checkpoint(cfg))
    assert (got.parallel.mode, got.parallel.tp_size, got.parallel.pp_size) == ("single", 1, 1)
    assert "parallel=auto chose single (tp=1, pp=1): no CUDA device" in caplog.text
