"""The AWQ GEMV's machine code without a GPU: compiles kernels/awq.py's _gemv_kernel for SM90 with
Triton's bundled ptxas, disassembles it with the bundled cuobjdump, and counts the instructions of its
K loop per weight a thread handles (the figure the loop's issue rate follows).

    python experiments/sass_count.py                      # the table's GEMV tiles, with and without
                                                          # Tiles.x_vec and Tiles.mask_arg
    python experiments/sass_count.py 256 64 2 16 1 1      # BLOCK_N BLOCK_K warps splits x_vec mask_arg

Arguments are specialized as a launch on real tensors would be (pointers and sizes divisible by 16),
so loads vectorize as on the device. Counts only: whether fewer instructions run faster is measured on
the GPU (quant_kernels.py --awq-gemv).
"""

import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nanoslg.model.quant.kernels import awq

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
SIG = {
    "x_ptr": "*bf16", "qw_ptr": "*i32", "z_ptr": "*u8", "s_ptr": "*fp16", "y_ptr": "*bf16", "part_ptr": "*fp32",
    "count_ptr": "*i32", "N": "i32", "K_SPLIT": "i32", "MASK": "i32", "ONE": "i32", "X_UP": "i32", "GROUP": "constexpr",
    "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "SPLITS": "constexpr", "FUSED_SUM": "constexpr",
    "X_VEC": "constexpr", "MASK_ARG": "constexpr", "SILU_MUL": "constexpr",
}  # fmt: skip


def sass(block_n: int, block_k: int, warps: int, splits: int, x_vec: bool, mask_arg: bool) -> str:
    names = list(SIG)
    div = {(names.index(a),): [["tt.divisibility", 16]] for a in names[:12]}
    consts = dict(GROUP=128, BLOCK_N=block_n, BLOCK_K=block_k, SPLITS=splits, FUSED_SUM=splits > 1, X_VEC=x_vec)
    consts.update(MASK_ARG=mask_arg, SILU_MUL=False)
    src = ASTSource(fn=awq._gemv_kernel, signature=SIG, constexprs=consts, attrs=div)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([f"{BIN}/cuobjdump", "-sass", f.name], capture_output=True, text=True).stdout


def loop_ops(code: str) -> collections.Counter:
    """Opcodes between the K loop's backward branch and its target (the first backward branch)."""
    lines = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", code)]
    for addr, text in lines:
        m = re.search(r"BRA (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            start = int(m.group(1), 16)
            body = [t for a, t in lines if start <= a <= addr]
            return collections.Counter(re.sub(r"^@!?U?P\w+ ", "", t).split()[0].split(".")[0] for t in body)
    return collections.Counter()


def report(block_n: int, block_k: int, warps: int, splits: int, x_vec: bool, mask_arg: bool) -> None:
    ops = loop_ops(sass(block_n, block_k, warps, splits, x_vec, mask_arg))
    weights = block_n * block_k // (32 * warps)  # per thread per iteration
    top = " ".join(f"{op} {n}" for op, n in ops.most_common(8))
    total = sum(ops.values())
    cfg = (
        f"BLOCK_N {block_n} BLOCK_K {block_k} warps {warps} splits {splits} x_vec {int(x_vec)} mask_arg {int(mask_arg)}"
    )
    print(f"{cfg}: {total} per {weights} weights = {total / weights:.2f} a weight ({top})", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        report(*(int(a) for a in sys.argv[1:7]))
    else:
        for (n, k, rows), t in awq.TABLE.items():
            if rows == 1:
                print(f"N {n} K {k}:")
                for x_vec, mask_arg in ((False, False), (True, False), (False, True), (True, True)):
                    report(t.block_n, t.block_k, t.warps, t.splits, x_vec, mask_arg)
