"""A decode step's page tables as the XQA kernel reads them: each row's pages in a dense
[rows, max_pages] table, and its KV length, built on the device from FlashInfer's CSR form.

FlashInfer's own kernels take the pages as CSR (indptr, indices, last page lengths). XQA takes one
row of page ids per sequence and its length. This kernel converts one into the other inside the
step (in a CUDA graph, inside the captured graph), so the host keeps writing only the CSR.

One program per row b: table[b, j] = indices[indptr[b] + j] for j < indptr[b+1] - indptr[b], and
seq_lens[b] = (pages - 1) * page_size + last_len[b]. Entries past a row's pages are left as they
are: XQA reads only the pages its length covers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _csr_to_table_kernel(indptr_ptr, indices_ptr, last_ptr, table_ptr, lens_ptr, stride_row, PAGE: tl.constexpr,
                         BLOCK: tl.constexpr):  # fmt: skip
    b = tl.program_id(0)
    start = tl.load(indptr_ptr + b)
    n = tl.load(indptr_ptr + b + 1) - start
    tl.store(lens_ptr + b, (n - 1) * PAGE + tl.load(last_ptr + b))
    offs = tl.arange(0, BLOCK)
    row = table_ptr + b.to(tl.int64) * stride_row
    for j in range(0, n, BLOCK):
        m = j + offs < n
        tl.store(row + j + offs, tl.load(indices_ptr + start + j + offs, mask=m), mask=m)


def csr_to_table(
    indptr: torch.Tensor,
    indices: torch.Tensor,
    last_len: torch.Tensor,
    table: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
) -> None:
    """Fills table[:rows] and seq_lens[:rows] (rows = len(indptr) - 1) from the CSR page tables."""
    rows = indptr.shape[0] - 1
    if rows > table.shape[0] or table.stride(1) != 1:
        raise ValueError(f"the page table holds {table.shape[0]} contiguous rows, the step has {rows}")
    _csr_to_table_kernel[(rows,)](
        indptr, indices, last_len, table, seq_lens, table.stride(0), PAGE=page_size, BLOCK=256
    )
