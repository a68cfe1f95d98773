"""Batched decode attention for the sdpa backend: the one-token rows of a step attend in a few
scaled_dot_product_attention calls (one per length group) instead of one call per sequence.

A group's keys are gathered from the page pool through a padded slot table [b, width] built once
per step; padding points at the row's first slot and an additive mask hides it (masked keys still
pass through the kernel, so they must be real, finite data: 0 * NaN is NaN).
The GQA group is folded into the query length: q [b, Hkv, G, D] against k, v [b, Hkv, width, D], so
no enable_gqa is needed and every query of the row sees every unmasked key (no causal mask).
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# Key lengths are padded to a multiple of this: mask rows stay 16-aligned (the mem-efficient kernel
# pads them with a copy otherwise) and shapes repeat from step to step.
BUCKET = 64
# A group of this padded length or less is never split for padding: another call costs more.
SPLIT_MIN = 512
# The most K+V bytes one group's gather may copy (memory the pool's sizing does not count): a long
# sequence among many short ones would otherwise pad every row to its length.
GATHER_BYTES = 1 << 29


def bucket(n: int) -> int:
    return -(-n // BUCKET) * BUCKET


def group_rows(lens: list[int], cap_tokens: int) -> list[list[int]]:
    """Indices into lens (the decode rows' key counts) in groups, each ascending. Rows are taken
    longest first; a row joins the open group while the group's padded size stays under cap_tokens
    and, for wide groups, the row's own padded length is over half the group's (bounded waste)."""
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    groups, i = [], 0
    while i < len(order):
        width = bucket(lens[order[i]])
        j = i + 1
        while (
            j < len(order)
            and (j - i + 1) * width <= cap_tokens
            and (width <= SPLIT_MIN or 2 * bucket(lens[order[j]]) > width)
        ):
            j += 1
        groups.append(sorted(order[i:j]))
        i = j
    return groups


@dataclass
class GroupPlan:
    """A group as the host plans it: its rows, their key counts, and their pages."""

    rows: list[int]  # rows of the step's tokens
    lens: list[int]
    width: int  # padded key length
    table: np.ndarray  # [b, ceil(width / page_size)] page ids; short rows repeat their first page


def plan_groups(decodes: list[tuple[int, int, list[int]]], token_bytes: int, page_size: int) -> list[GroupPlan]:
    """The step's decode rows (row, key count, pages), grouped by group_rows, with page tables.
    token_bytes: what one key's K and V take once gathered."""
    out = []
    for g in group_rows([d[1] for d in decodes], max(BUCKET, GATHER_BYTES // token_bytes)):
        rows, lens, pages = zip(*(decodes[i] for i in g))
        width = bucket(max(lens))
        table = np.empty((len(g), -(-width // page_size)), dtype=np.int64)
        for r, p in enumerate(pages):
            n = min(len(p), table.shape[1])
            table[r, :n] = p[:n]
            table[r, n:] = p[0]
        out.append(GroupPlan(list(rows), list(lens), width, table))
    return out


@dataclass(eq=False)
class DecodeGroup:
    rows: torch.Tensor | None  # the group's rows of the step's tokens; None: all of them, in order
    slots: torch.Tensor  # [b, width] pool slots of each row's keys, padding at the row's first slot
    bias: torch.Tensor  # [b, 1, 1, width] additive mask: 0 for a key, -inf for padding


def build_group(
    rows: torch.Tensor | None, lens: torch.Tensor, table: torch.Tensor, width: int, page_size: int, dtype: torch.dtype
) -> DecodeGroup:
    """Device-side: the slot table and mask from the page table (a few ops per step, none per layer)."""
    pos = torch.arange(width, device=table.device)
    slots = table[:, pos // page_size] * page_size + pos % page_size
    valid = pos[None, :] < lens[:, None]
    slots = torch.where(valid, slots, slots[:, :1])
    bias = torch.zeros(valid.shape, dtype=dtype, device=table.device).masked_fill_(~valid, float("-inf"))
    return DecodeGroup(rows, slots, bias[:, None, None, :])


def attend_group(q: torch.Tensor, group: DecodeGroup, read, num_kv_heads: int, scale: float, kernels) -> torch.Tensor:
    """q: the step's queries [T, Hq, D]; read(slots) -> (k, v) [n, Hkv, D]. Returns [b, Hq, D]."""
    b, width = group.slots.shape
    hq, d = q.shape[1], q.shape[2]
    qg = q if group.rows is None else q.index_select(0, group.rows)
    # Query head h reads KV head h // G, so [b, Hq, D] is [b, Hkv, G, D] as it lies.
    qg = qg.reshape(b, num_kv_heads, hq // num_kv_heads, d).contiguous()
    k, v = read(group.slots.view(-1))
    k = k.view(b, width, num_kv_heads, d).transpose(1, 2)  # strided views: the kernels take any
    v = v.view(b, width, num_kv_heads, d).transpose(1, 2)  # stride but the last
    with sdpa_kernel(kernels) if kernels else nullcontext():
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=group.bias, scale=scale)
    return out.reshape(b, hq, d)


def decode_kernels(num_kv_heads: int, group: int, head_dim: int, dtype: torch.dtype, device: torch.device):
    """The SDPA kernels the batched decode call may use: on CUDA the memory-efficient kernel alone
    where a probe with the decode layout runs it; else None (torch's own choice).

    Flash takes no mask. cuDNN, first in torch's order on recent GPUs, builds a graph per shape,
    and a decode group's shape changes nearly every step. Naming the kernel also means a layout it
    rejected would raise rather than fall back to the math kernel, which materializes the scores."""
    if device.type != "cuda":
        return None
    backends = [SDPBackend.EFFICIENT_ATTENTION]
    q = torch.zeros(1, num_kv_heads, max(group, 1), head_dim, dtype=dtype, device=device)
    k = torch.zeros(1, BUCKET, num_kv_heads, head_dim, dtype=dtype, device=device).transpose(1, 2)
    bias = torch.zeros(1, 1, 1, BUCKET, dtype=dtype, device=device)
    try:
        with warnings.catch_warnings(), sdpa_kernel(backends):
            warnings.simplefilter("ignore")  # torch explains at length why a kernel does not fit
            F.scaled_dot_product_attention(q, k, k, attn_mask=bias)
    except RuntimeError:
        return None
    return backends
