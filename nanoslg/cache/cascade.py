"""Cascade attention for decode steps whose sequences all begin with the same cached pages.

Decode is bound by reading KV. When every sequence of a step starts with the same prefix pages
(prefix caching hands them out once), a plain kernel reads those pages once per sequence. Cascade
attention reads them once per step: level 0 attends every query of the step to the shared pages
(no mask: they all lie before every query), level 1 attends each sequence to its own pages, and
the two partial results are merged by their log-sum-exp. The math is exact; only the order of the
floating-point sums changes, as it does between kernels that split the KV differently.

`shared_prefix_pages` is the host-side decision, shared by the GPU backend and its plain-torch twin
(`paged`), which runs the same two levels on the CPU so CI tests them.
"""

from __future__ import annotations

import math

import torch

# As vLLM decides: below these the extra kernel and the merge cost more than the reads they save.
MIN_SHARED_TOKENS = 256
MIN_BATCH = 8


def shared_prefix_pages(seqs, page_size: int) -> int:
    """How many leading pages every sequence's block table has in common and no sequence writes
    this step (they end before its first new token); 0 when that is too little to pay off."""
    if len(seqs) < MIN_BATCH:
        return 0
    first = seqs[0].block_table
    n = min([st.start for st in seqs]) // page_size
    if n * page_size < MIN_SHARED_TOKENS:
        return 0
    head = first[:n]
    for st in seqs:  # every decode step: one slice and one C-level compare per sequence
        bt = st.block_table
        if bt[:n] != head:
            n = next(i for i in range(n) if bt[i] != head[i])
            if n * page_size < MIN_SHARED_TOKENS:
                return 0
            head = first[:n]
    return n


def attend_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, start: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, Hq, D] against k, v [L, Hkv, D] in float32; returns (out [n, Hq, D], lse [n, Hq]), lse
    in natural log. start=None: no mask (every key lies before every query); else the queries sit at
    positions start.. of a sequence whose keys k are its positions start+n-L.. (causal)."""
    group = q.shape[1] // k.shape[1]
    qf = q.float().transpose(0, 1)  # [Hq, n, D]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    s = qf @ kf.transpose(1, 2) * scale  # [Hq, n, L]
    if start is not None:
        n, L = q.shape[0], k.shape[0]
        qpos = torch.arange(start, start + n, device=q.device)[:, None]
        kpos = torch.arange(start + n - L, start + n, device=q.device)[None, :]
        s = s.masked_fill(kpos > qpos, -math.inf)
    lse = torch.logsumexp(s, dim=-1)  # [Hq, n]
    out = torch.softmax(s, dim=-1) @ vf
    return out.transpose(0, 1), lse.transpose(0, 1)


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over the union of two disjoint key sets from each set's (out, lse)."""
    lse = torch.logaddexp(lse_a, lse_b)
    wa, wb = torch.exp(lse_a - lse)[..., None], torch.exp(lse_b - lse)[..., None]
    return out_a * wa + out_b * wb
