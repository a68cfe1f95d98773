"""Piecewise CUDA graphs for the steps decode graphs do not take: prefill chunks and mixed steps.

An eager step launches every kernel of every layer from Python, and for a small model (or a short
chunk of a large one) that launching takes longer than the kernels run. Attention cannot sit in a
graph here: its plan depends on the step's sequences. So the forward is cut at its attention calls
(`LlamaForCausalLM.piece`): per token-count bucket, one graph per piece (embedding + layer 0's q, k,
v; then each layer's o projection, MLP and the next layer's q, k, v; then the last MLP and norm),
and between replays the step's attention runs eagerly on the piece's q, k, v, its output copied
into a fixed buffer the next piece reads. A step of n tokens replays the smallest bucket >= n; its
padding rows compute on stale ids and are never read (every op in a piece works row by row).

Memory: the pieces of every bucket share one pool. q, k, v are read only by the attention that
follows their piece, and the residual only by the pieces of its own step, so once a piece is
captured its outputs are held by non-owning tensors and the next captures may reuse the memory.
That is safe because replays run in capture order and never two steps at once (one stream).
"""

from __future__ import annotations

import logging
import time

import torch
from tqdm import tqdm

log = logging.getLogger("nanoslg.graphs")

# A step's GEMM work (tokens x weight parameters) below which its eager launch may take longer than
# its kernels run: the auto rule for the largest bucket (runtime/build.py). Above it the kernels hide
# the launch, and padding to a bucket would only add work.
AUTO_TOKEN_PARAMS = 2**43
MIN_BUCKET = 16


FINE_FROM = 256  # from here on, buckets every quarter octave: a padded step computes at most 25% more


def buckets_up_to(max_tokens: int) -> list[int]:
    """Token counts 16, 24, 32, 48, ... 256 (powers of two and 1.5x them), then 320, 384, 448, 512,
    640, ... (four to an octave), up to max_tokens, and max_tokens itself."""
    out, b = [], MIN_BUCKET
    while b < max_tokens:
        steps = (b, b * 3 // 2) if b < FINE_FROM else tuple(b + j * b // 4 for j in range(4))
        out.extend(x for x in steps if x < max_tokens)
        b *= 2
    return [*out, max_tokens]


def auto_max_tokens(budget: int, weight_params: int) -> int:
    """The largest bucket for `model.piecewise_max_tokens=null`: the step budget, capped where a step's
    GEMMs (tokens x parameters) reach AUTO_TOKEN_PARAMS, rounded down to a power of two."""
    cap = max(MIN_BUCKET, AUTO_TOKEN_PARAMS // max(1, weight_params))
    return min(budget, 1 << (cap.bit_length() - 1))


def _non_owning(t: torch.Tensor) -> torch.Tensor:
    """A view of t's memory that does not keep it allocated (torch's CUDA-graph trees do the same)."""
    st = t.untyped_storage()
    storage = torch._C._construct_storage_from_data_pointer(st.data_ptr(), t.device, st.nbytes())
    return torch.empty((), dtype=t.dtype, device=t.device).set_(storage, t.storage_offset(), t.shape, t.stride())


def unavailable() -> str | None:
    """Why this torch cannot hold a piece's outputs without keeping them allocated, or None."""
    if not hasattr(torch._C, "_construct_storage_from_data_pointer"):
        return f"torch {torch.__version__} lacks torch._C._construct_storage_from_data_pointer"
    return None


class PiecewiseGraphs:
    """The pieces of every bucket. Until capture() runs (the CPU, where tests check the cutting and
    the padding against the plain forward), run() calls each piece eagerly on the same buffers."""

    def __init__(self, model, max_tokens: int, device: torch.device):
        self.model = model
        self.layers = model.decoder_layers
        self.buckets = buckets_up_to(max_tokens)
        self.max_tokens = max_tokens
        dtype = model.model.embed_tokens.weight.dtype
        self.ids = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.o = torch.zeros(max_tokens, self.layers[0].self_attn.q_size, dtype=dtype, device=device)
        self.pieces: dict[int, list] = {}  # bucket -> per piece: (graph, outputs) captured, else None
        self.steps = 0  # steps run through the pieces

    def can_run(self, num_tokens: int) -> bool:
        return 0 < num_tokens <= self.max_tokens

    @torch.inference_mode()
    def capture(self) -> None:
        pool, t0 = torch.cuda.graph_pool_handle(), time.perf_counter()
        for b in tqdm(list(reversed(self.buckets)), desc="capturing piecewise CUDA graphs"):
            self.pieces[b] = self._capture_bucket(b, pool)
        torch.cuda.synchronize()
        log.info(
            "captured piecewise CUDA graphs: %d pieces x %d token counts up to %d, in %.2f s",
            len(self.layers) + 1,
            len(self.buckets),
            self.max_tokens,
            time.perf_counter() - t0,
        )

    def _capture_bucket(self, b: int, pool) -> list:
        ids, o, residual, pieces = self.ids[:b], self.o[:b], None, []
        last = len(self.layers)
        for i in range(last + 1):
            if i in (0, 1, last):  # warm-up outside the graph; the pieces between run piece 1's kernels
                self.model.piece(i, ids, o, residual)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                qkv, out = self.model.piece(i, ids, o, residual)
            if qkv is None:  # the last piece: out is the normed hidden state
                pieces.append((graph, _non_owning(out)))
            else:
                pieces.append((graph, tuple(_non_owning(t) for t in qkv)))
                residual = out  # owned until the next piece is captured (it reads it)
            del qkv, out
        return pieces

    def run(self, input_ids: torch.Tensor, ctx) -> torch.Tensor:
        """The step's normed hidden states [n, H]: pieces replayed, attention eager between them."""
        n = input_ids.shape[0]
        b = next(x for x in self.buckets if x >= n)
        self.steps += 1
        self.ids[:n].copy_(input_ids)
        ids, o, positions = self.ids[:b], self.o[:b], ctx.positions
        pieces = self.pieces.get(b)
        residual = None
        for i, layer in enumerate(self.layers):
            if pieces is not None:
                graph, (q, k, v) = pieces[i]
                graph.replay()
            else:
                (q, k, v), residual = self.model.piece(i, ids, o, residual)
            self.o[:n].copy_(layer.self_attn.attend(positions, q[:n], k[:n], v[:n], ctx))
        if pieces is not None:
            graph, hidden = pieces[-1]
            graph.replay()
        else:
            _, hidden = self.model.piece(len(self.layers), ids, o, residual)
        return hidden[:n]
