"""The greedy pick's Triton kernels (nanoslg/model/argmax.py) give torch.argmax's index: in Triton's
interpreter on the CPU (wherever Triton is installed), and compiled on a GPU."""

import pytest
import torch
from triton_interp import interpret

CASES = r"""
import torch
from nanoslg.model.argmax import CHUNK, argmax_rows

def cases(device):
    g = torch.Generator().manual_seed(0)
    for v in (7, CHUNK, CHUNK + 1, 5000, 128256):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(5, v, generator=g).to(dtype)
            x[1] = x[1].round()  # many ties: the first index of the largest wins
            if v > CHUNK:  # the same largest in two chunks, the later one written first
                top = x[2].max() + 1
                x[2, v - 1], x[2, CHUNK - 1] = top, top
            x[3] = float("-inf")  # a row masked whole (a grammar with nothing allowed): index 0
            x[4, : v // 2] = float("-inf")
            yield x.to(device)
    yield torch.zeros(0, 10, device=device)  # no rows

def check(device):
    n = 0
    for x in cases(device):
        got, want = argmax_rows(x), x.argmax(dim=-1)
        assert got.dtype == torch.int64 and torch.equal(got, want), (x.shape, x.dtype, got, want)
        n += 1
    x = torch.randn(3, 2 * CHUNK + 6, device=device)[:, ::2]  # rows not contiguous
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    return n
"""


def test_argmax_kernels_in_the_interpreter():
    interpret(CASES + 'assert check("cpu") == 16\nprint("ok")\n')


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_argmax_kernels_on_the_gpu():
    pytest.importorskip("triton")
    scope: dict = {}
    exec(CASES, scope)
    assert scope["check"]("cuda") == 16
