"""torch's int4 kernel (tinygemm: torch._weight_int4pack_mm) against NanoSLG's AWQ GEMV at one row, on
Llama-3.1-8B's four linear shapes (group 128), the weights repacked from NanoSLG's AWQ layout.

    python experiments/int4_tinygemm.py     # on a GPU

tinygemm takes 4-bit values packed by torch._convert_weight_to_int4pack from uint8 [N, K / 2] and one
bf16 (scale, zero) pair per group and column, dequantizing (q - 8) * scale + zero; AWQ's (q - z) * s is
that with zero = (8 - z) * s. Which nibble of a byte holds the even K index is found by trying both
against x @ the dequantized weight. Times come from CUDA graphs over weight copies past L2, as in
quant_kernels.py.
"""

import torch
from quant_kernels import DEV, GROUP, SHAPES, copies, nbytes, timed, timed_fn

from nanoslg.model.quant.awq import dequantize, pack_k
from nanoslg.model.quant.kernels import awq as awq_k


def to_tinygemm(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor, even_high: bool, inner: int):
    """q [K, N] uint8 values, z, s [K / group, N] -> (packed int32, scales_and_zeros [K / group, N, 2])."""
    w = q.t().contiguous()  # [N, K]
    lo, hi = (w[:, 1::2], w[:, ::2]) if even_high else (w[:, ::2], w[:, 1::2])
    packed = torch._convert_weight_to_int4pack((hi << 4 | lo).contiguous(), inner)
    sz = torch.stack([s.float(), (8 - z.float()) * s.float()], dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; int4 at one row", flush=True)
    g = torch.Generator(device=DEV).manual_seed(0)
    layout = None
    for name, (n, k) in SHAPES.items():
        q = torch.randint(0, 16, (k, n), device=DEV, dtype=torch.uint8, generator=g)
        z = torch.randint(0, 16, (k // GROUP, n), device=DEV, dtype=torch.uint8, generator=g)
        s = (torch.rand(k // GROUP, n, device=DEV, generator=g) * 0.002 + 0.002).half()
        x = torch.randn(1, k, device=DEV, dtype=torch.bfloat16, generator=g)
        ref = x.float() @ dequantize(pack_k(q), z, s, GROUP)
        for even_high in (True, False) if layout is None else (layout[0],):
            for inner in (2, 4, 8) if layout is None else (layout[1],):
                packed, sz = to_tinygemm(q, z, s, even_high, inner)
                y = torch._weight_int4pack_mm(x, packed, GROUP, sz).float()
                err = ((y - ref).abs().max() / ref.abs().max()).item()
                print(f"  {name}: even K in the high nibble {even_high}, inner K tiles {inner}: error {err:.2e}")
                if err < 1e-2 and layout is None:
                    layout = (even_high, inner)
        if layout is None:
            print("no packing matched the reference: stopped")
            return
        ws = []
        for w in copies(n, k, "awq"):  # the same number of copies as the AWQ GEMV's timing rotates
            qv = torch.stack([(w[0] >> (4 * j)) & 0xF for j in range(8)], 1).reshape(k, n).to(torch.uint8)
            ws.append(to_tinygemm(qv, w[1], w[2], *layout))
        tiny = timed_fn(lambda w, x=x: torch._weight_int4pack_mm(x, w[0], GROUP, w[1]), ws)
        ours = timed("awq-fused", n, k, 1, awq_k.tiles(1, n, k, GROUP, torch.device(DEV)))
        gb = nbytes(n, k, "awq") / 1e3
        print(
            f"{name:8s} N={n} K={k}: tinygemm {tiny:.1f} us ({gb / tiny:.0f} GB/s) | "
            f"AWQ GEMV {ours:.1f} us ({gb / ours:.0f} GB/s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
