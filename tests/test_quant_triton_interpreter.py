"""The quantization methods' Triton kernels (nanoslg/model/quant/kernels/) run in Triton's interpreter on
the CPU, against the torch reference paths: their indexing, masking, K splits and packing are checked
wherever Triton is installed, GPU or not (skipped without it; the GPU suite runs them compiled).

The interpreter converts float32 to bfloat16 and to float8 inexactly (numpy has neither type), so
the GEMMs run here in float16 and the FP8 rounding kernel on inputs that need no rounding; the GPU
suite covers both types on the hardware. The FP8 skinny kernel is checked on such inputs too (rows of
float8 values times a power of two, each holding +-448 times it, so the per-row scale is that power and
x / scale is exact), in float32 against the reference to the last bits of a float32 sum.
"""

import pytest
from triton_interp import interpret

pytest.importorskip("triton")

SCRIPT = r"""
import torch
from quant_ckpt import awq_pack, awq_quantize
from nanoslg.model.quant.awq import awq_linear_torch, pack_k, unpack_awq
from nanoslg.model.quant.awq import dequantize as dequantize_torch
from nanoslg.model.quant.fp8 import quantize_act
from nanoslg.model.quant.kernels import awq, fp8

torch.manual_seed(0)
# (rows, inputs, outputs, group): the GEMV with and without K splits, the GEMM's row tiles, the
# dequantize path; outputs that are not a multiple of the block (masking).
for m, k, n, g in [(1, 256, 96, 64), (1, 512, 40, 128), (3, 256, 64, 32), (20, 128, 80, 128), (40, 128, 72, 16),
                   (awq.DEQUANT_ROWS, 128, 48, 32)]:
    values, zeros, scales = awq_quantize(torch.randn(n, k) * 0.05, g)
    qweight, zero_bytes = pack_k(unpack_awq(awq_pack(values))), unpack_awq(awq_pack(zeros))
    assert torch.equal(awq.dequantize(qweight, zero_bytes, scales, g, torch.float32),
                       dequantize_torch(qweight, zero_bytes, scales, g))
    x = torch.randn(m, k).half()
    ref = awq_linear_torch(x.float(), qweight, zero_bytes, scales, g)
    out = awq.awq_linear(x, qweight, zero_bytes, scales, g).float()
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < 2e-3, (m, k, n, g, err)
    if m == 1:  # the GEMV reads bf16 too (it converts only to float32)
        out = awq.awq_linear(x.bfloat16(), qweight, zero_bytes, scales, g).float()
        assert ((out - awq_linear_torch(x.bfloat16().float(), qweight, zero_bytes, scales, g)).abs().max()
                / ref.abs().max()).item() < 1e-2

# FP8 rows: values on the float8 grid times a row scale (no rounding), a zero row, a short row.
grid = torch.tensor([0.0, 0.5, -1.0, 3.0, -448.0, 448.0, 13.0, -0.125])
x = grid[torch.randint(0, 8, (4, 700))] * torch.tensor([[0.01], [2.0], [0.0], [1.0]])
for rows in (x, x[:, :37]):
    q, s = fp8.quantize_rows(rows.contiguous())
    q_ref, s_ref = quantize_act(rows)
    assert torch.equal(s, s_ref) and torch.equal(q.float(), q_ref.float())
print("ok")
"""


SKINNY = r"""
import torch
from nanoslg.model.quant.fp8 import fp8_linear_torch, quantize_weight
from nanoslg.model.quant.kernels import fp8
from nanoslg.model.quant.kernels.fp8 import Skinny, fp8_skinny, quantize_rows

torch.manual_seed(0)
grid = torch.tensor([0.0, 0.5, -1.0, 3.0, -448.0, 448.0, 13.0, -0.125, 0.25, -6.0])


def on_grid(m, k, static):
    x = grid[torch.randint(0, len(grid), (m, k))]
    if static:  # one scale for all rows, x / scale exact
        return x * 0.25
    x[:, 0] = 448.0  # every row's absolute max: scale = its power of two
    x = x * 2.0 ** torch.randint(-4, 4, (m, 1)).float()
    if m > 2:
        x[1] = 0.0  # an all-zero row: scale 1e-12, zeros out
    return x


# (rows, outputs, inputs): K a multiple of the tile and not, outputs not a multiple of the block.
for m, n, k in [(1, 40, 700), (1, 64, 1024), (3, 24, 300), (5, 33, 96), (17, 20, 160)]:
    wq, ws = quantize_weight(torch.randn(n, k) * 0.02)
    for static in (False, True):
        act = torch.tensor([0.25]) if static else None
        x = on_grid(m, k, static)
        ref = fp8_linear_torch(x, wq, ws, act)
        # FMA path (one row) and tl.dot path, with and without K splits (the last split short or empty)
        for cfg in (Skinny(16, 64, 4, 1, False), Skinny(8, 128, 4, 3, False), Skinny(16, 32, 4, 1, True),
                    Skinny(32, 64, 2, 4, True), Skinny(16, 256, 4, 5, True)):
            out = fp8_skinny(x, wq, ws, act, cfg)
            assert out.dtype == x.dtype and out.shape == (m, n)
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-6, (m, n, k, static, cfg, err)
            # the last split adds the parts as the kernel of their own does, and leaves its counters at 0
            counts = fp8.split_counts(n, x.device)
            assert torch.equal(fp8_skinny(x, wq, ws, act, cfg, counts=counts), out) and not counts.any()
        # the default config through fp8_linear (more rows go to _scaled_mm, GPU only), and half precision
        if m <= fp8.SKINNY_ROWS:
            assert ((fp8.fp8_linear(x, wq, ws, act, "rowwise") - ref).abs().max() / ref.abs().max()).item() < 1e-6
        # One row is quantized in the kernel: the bits of quantize_rows and then the kernel, and of the
        # same row in a step of more rows (whose rows quantize_rows rounds first)
        if not static:
            cfg = fp8.skinny_config(fp8.DOT_ROWS, n, k, x.device)
            for xt in (x, x.bfloat16()):
                q, s = quantize_rows(xt[:1])
                two = fp8_skinny(q, wq, ws, None, cfg=cfg, x_scale=s, out_dtype=xt.dtype)
                one = fp8.fp8_linear(xt[:1], wq, ws, None, "rowwise")
                assert torch.equal(one, two)
                counts = fp8.split_counts(n, x.device)
                assert torch.equal(fp8.fp8_linear(xt[:1], wq, ws, None, "rowwise", counts=counts), one)
                assert not counts.any()
                assert torch.equal(fp8.fp8_linear(xt, wq, ws, None, "rowwise")[:1], one)
            # [gate | up] in, silu(gate) * up multiplied. The interpreter rounds to bf16 and float8 its own
            # way, so the activation is exact: silu(0) = 0 and silu(32) = 32 in float32, up = x / 32.
            gate = torch.where(torch.rand(1, k) < 0.7, 32.0, 0.0)
            gate[0, 0] = 32.0  # x's absolute max stays in
            h = torch.cat([gate, x[:1] / 32], dim=1).bfloat16()
            gated = (gate / 32 * x[:1]).bfloat16()
            counts = fp8.split_counts(n, x.device)
            got = fp8.fp8_linear(h, wq, ws, None, "rowwise", counts=counts, silu_mul=True)
            assert torch.equal(got, fp8.fp8_linear(gated, wq, ws, None, "rowwise")) and not counts.any()
            assert not torch.equal(got, fp8.fp8_linear(x[:1].bfloat16(), wq, ws, None, "rowwise"))  # gate applied
            try:
                fp8.fp8_linear(h[:, :k], wq, ws, None, "rowwise", silu_mul=True)
                raise AssertionError("a row of K with silu_mul was taken")
            except ValueError as e:
                assert "silu_mul" in str(e)
        out = fp8_skinny(x.half(), wq, ws, act, Skinny(16, 64, 4, 2, m > 1))
        assert out.dtype == torch.float16 and ((out.float() - ref).abs().max() / ref.abs().max()).item() < 1e-3
        # x rounded beforehand by quantize_rows
        if not static:
            q, s = quantize_rows(x)
            out = fp8_skinny(q, wq, ws, None, Skinny(16, 64, 4, 2, m > 1), x_scale=s).float()
            assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-2  # bfloat16 out, rounded inexactly here
            counts = fp8.split_counts(n, x.device)
            again = fp8_skinny(q, wq, ws, None, Skinny(16, 64, 4, 2, m > 1), x_scale=s, counts=counts).float()
            assert torch.equal(again, out) and not counts.any()
print("ok")
"""

AWQ_TILES = r"""
import torch
from quant_ckpt import awq_pack, awq_quantize
from nanoslg.model.quant.awq import awq_linear_torch, pack_k, unpack_awq
from nanoslg.model.quant.kernels import awq
from nanoslg.model.quant.kernels.awq import Tiles

torch.manual_seed(1)
# Explicit tiles: K tiles smaller than the group (several tiles per group), several groups per split,
# splits of one tile, outputs not a multiple of the block, 2..3 warps' worth of rows.
for m, k, n, g, cfg in [
    (1, 512, 72, 128, Tiles(64, 64, 2, 2)),
    (1, 512, 72, 128, Tiles(32, 128, 4, 4)),
    (1, 256, 40, 32, Tiles(64, 32, 4, 8)),
    (1, 1024, 136, 128, Tiles(128, 128, 4, 1)),
    (3, 512, 72, 64, Tiles(32, 64, 4, 2, 3)),
    (17, 256, 40, 128, Tiles(64, 64, 4, 1)),
    (8, 256, 96, 32, Tiles(32, 32, 4, 8, 4)),
]:
    values, zeros, scales = awq_quantize(torch.randn(n, k) * 0.05, g)
    qweight, zero_bytes = pack_k(unpack_awq(awq_pack(values))), unpack_awq(awq_pack(zeros))
    x = torch.randn(m, k).half()
    ref = awq_linear_torch(x.float(), qweight, zero_bytes, scales, g)
    out = awq.awq_linear(x, qweight, zero_bytes, scales, g, cfg).float()
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    assert err < 2e-3, (m, k, n, g, cfg, err)
    # the GEMV in float32 out (no rounding of the result): the float trick loses nothing; the last
    # split adds the parts as the kernel of their own does, bit for bit, and leaves its counters at 0
    if m == 1:
        out = awq.awq_linear(x.float(), qweight, zero_bytes, scales, g, cfg)
        assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5
        counts = awq.split_counts(n, x.device)
        for _ in range(2):
            assert torch.equal(awq.awq_linear(x.float(), qweight, zero_bytes, scales, g, cfg, counts), out)
            assert not counts.any()
        # x's inputs in one load per packed row, the mask as an argument: the same arithmetic, the same bits
        for lean in (dict(x_vec=True), dict(mask_arg=True), dict(x_vec=True, mask_arg=True)):
            assert torch.equal(awq.awq_linear(x.float(), qweight, zero_bytes, scales, g, cfg._replace(**lean)), out)
            # silu(gate) * up computed as the GEMV loads it, against the activation on its own first
            h = torch.randn(1, 2 * k).half()
            act = (torch.nn.functional.silu(h[:, :k].float()) * h[:, k:].float()).half()
            want = awq.awq_linear(act, qweight, zero_bytes, scales, g, cfg._replace(**lean)).float()
            got = awq.awq_linear(h, qweight, zero_bytes, scales, g, cfg._replace(**lean), counts, silu_mul=True)
            assert ((got.float() - want).abs().max() / want.abs().max()).item() < 2e-3, (cfg, lean)
            assert not counts.any()
print("ok")
"""

FP8_MLP = r"""
import torch
from nanoslg.model.quant.fp8 import quantize_weight
from nanoslg.model.quant.kernels import fp8

torch.manual_seed(2)
# The one-row MLP in two kernels against gate_up, then down with silu(gate) * up in its loads (main's
# path before): the same bits, with I not a multiple of the half tile (masking) and down's K split.
for hidden, inter, out in [(128, 512, 96), (256, 520, 40)]:
    w1, s1 = quantize_weight(torch.randn(2 * inter, hidden) * 0.05)
    w2, s2 = quantize_weight(torch.randn(out, inter) * 0.05)
    x = (torch.randn(1, hidden) * 2).bfloat16()
    counts = fp8.split_counts(out, x.device)
    assert fp8.skinny_config(fp8.DOT_ROWS, out, inter, x.device).splits > 1
    h = fp8.fp8_linear(x, w1, s1, None, "rowwise")
    want = fp8.fp8_linear(h, w2, s2, None, "rowwise", counts=counts, silu_mul=True)
    got = fp8.fp8_mlp_one_row(x, w1, s1, w2, s2, counts=counts)
    assert got is not None and got.shape == (1, out) and torch.equal(got, want) and not counts.any(), (hidden, inter)
    # the gate_up kernel alone: h = silu(gate) * up as the down kernel computes it, and its slots' maximum
    cfg = fp8.skinny_config(fp8.DOT_ROWS, 2 * inter, hidden, x.device)
    slots = torch.zeros(-(-inter // (cfg.block_n // 2)))
    act = fp8.fp8_skinny(x, w1, s1, None, cfg=cfg, one_row=True, gate_up=True, slots=slots)
    assert act.shape == (1, inter) and torch.equal(slots.max(), act.float().abs().max())
    assert torch.equal(fp8.fp8_linear(act, w2, s2, None, "rowwise"), want)
    assert not torch.equal(act, h[:, :inter]) and not torch.equal(act, h[:, inter:])
# gate_up whose config splits K: none (the caller runs the kernels apart)
w1, s1 = quantize_weight(torch.randn(64, 1024) * 0.05)
assert fp8.fp8_mlp_one_row(x[:, :1].expand(1, 1024).contiguous(), w1, s1, w2, s2) is None
try:
    split = fp8.Skinny(16, 64, 4, 2, True)
    fp8.fp8_skinny(x[:, :128], w1[:, :128].contiguous(), s1, None, cfg=split, one_row=True, gate_up=True,
                   slots=torch.zeros(4))
    raise AssertionError("gate_up with K splits was taken")
except ValueError as e:
    assert "gate_up" in str(e)
print("ok")
"""


def test_fp8_mlp_one_row_in_the_interpreter():
    """The one-row FP8 MLP in two kernels (gate_up's epilogue computes silu(gate) * up and hands down its
    absolute max) gives the bits of gate_up, the activation and down run apart."""
    interpret(FP8_MLP)


def test_triton_kernels_in_the_interpreter():
    interpret(SCRIPT)


def test_fp8_skinny_kernel_in_the_interpreter():
    """The few-row FP8 kernel: activation rounding in the kernel (per row, static, or done before),
    one-row FMA and tl.dot paths, K splits summed after or by the last split, masking."""
    interpret(SKINNY)


def test_awq_tiles_in_the_interpreter():
    """The AWQ GEMV and GEMM under explicit tile configs (the tables' kind), K splits included (the
    GEMV's summed by its last split or by a kernel of their own), x loaded per input or per packed row,
    the GEMV's input computed from [gate | up] as it loads it."""
    interpret(AWQ_TILES)
