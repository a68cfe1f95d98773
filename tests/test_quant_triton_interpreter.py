"""The quantization methods' Triton kernels (nanoslg/model/quant/kernels/) run in Triton's interpreter on
the CPU, against the torch reference paths: their indexing, masking, K splits and packing are checked
wherever Triton is installed, GPU or not (skipped without it; the GPU suite runs them compiled).

The interpreter converts float32 to bfloat16 and to float8 inexactly (numpy has neither type), so
the GEMMs run here in float16 and the FP8 rounding kernel on inputs that need no rounding; the GPU
suite covers both types on the hardware.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_triton_kernels_in_the_interpreter():
    root = Path(__file__).resolve().parent.parent
    path = os.pathsep.join(p for p in (str(root), str(root / "tests"), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    res = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-3000:] + res.stderr[-3000:]
