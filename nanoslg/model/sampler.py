"""Batched sampling with per-sequence state (vLLM semantics).

Order per row: grammar mask -> min_tokens mask -> logit_bias -> penalties -> (greedy: argmax) temperature
-> top-k -> top-p -> min-p -> draw. The grammar mask (a bitmask per constrained row, from the engine's
matchers) is -inf, so nothing after it can bring a forbidden token back.

Draws use the exponential race (argmax of probs / Exp(1) noise), which samples from `probs` exactly;
a seeded sequence draws its noise from its own torch.Generator, so the same seed gives the same tokens
whatever else is in the batch. (The engine gives child i of an n>1 request seed + i.)

Penalties: repetition over prompt + output tokens (logit / p if > 0 else logit * p), frequency and
presence over output tokens only (logit -= f * count, logit -= p * [count > 0]).
Logprobs are the log_softmax of the raw logits, before any of the above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoslg.core.errors import ConfigError
from nanoslg.core.plan import NewSeq, TokenMasks
from nanoslg.core.sampling_params import SamplingParams
from nanoslg.core.tensors import to_device, to_host
from nanoslg.model.kernels import load_flashinfer


@dataclass
class _Seq:
    params: SamplingParams
    prompt: list[int]
    num_out: int  # tokens generated so far (including those before a preemption)
    stop_ids: list[int]
    gen: torch.Generator | None = None
    counts: torch.Tensor | None = None  # [V] output token counts (penalties only)
    seen: torch.Tensor | None = None  # [V] bool: in prompt or output (repetition penalty only)
    init_out: list[int] | None = None  # output tokens known at add(), folded into counts lazily
    bias: tuple[list[int], list[float]] | None = None  # logit_bias: token ids and their biases


class Sampler:
    def __init__(self, device: torch.device | str = "cpu", kernels: str = "auto"):
        self.device = torch.device(device)
        self.seqs: dict[int, _Seq] = {}
        # Sequences that need more than an argmax (sampling, penalties, min_tokens, logprobs): a step
        # with none of them is one argmax, without a Python pass over its rows.
        self.special: set[int] = set()
        self.fused = None
        if kernels == "auto":  # the fused kernel wherever it can run
            kernels = "flashinfer" if self.device.type == "cuda" and load_flashinfer() is not None else "torch"
        self.kernels = kernels
        if kernels == "flashinfer":
            if self.device.type != "cuda":
                raise ConfigError("model.sampling_kernels=flashinfer needs a CUDA device; use torch")
            from flashinfer import sampling  # deferred: a GPU-only dependency

            self.fused = sampling
        self.argmax = _argmax_for(self.device)

    def add(self, ns: NewSeq) -> None:
        if ns.seq_id in self.seqs:  # already known: keep its generator state
            return
        p = ns.params
        gen = None
        if p.seed is not None and not p.greedy:
            seed = p.seed % 2**64
            gen = torch.Generator(device=self.device).manual_seed(seed)
        # Only penalties read the prompt: no per-sequence copy of it otherwise (a burst of long prompts
        # would hand the garbage collector that many more elements to walk).
        prompt = list(ns.prompt_token_ids) if p.has_penalties else []
        bias = (list(p.logit_bias), list(p.logit_bias.values())) if p.logit_bias else None
        self.seqs[ns.seq_id] = _Seq(
            p, prompt, len(ns.output_token_ids), list(ns.stop_ids), gen, init_out=list(ns.output_token_ids), bias=bias
        )
        if not p.greedy or p.has_penalties or p.min_tokens > 0 or p.logprobs is not None or bias:
            self.special.add(ns.seq_id)

    def remove(self, seq_ids) -> None:
        for i in seq_ids:
            self.seqs.pop(i, None)
            self.special.discard(i)

    def _penalty_state(self, s: _Seq, vocab: int) -> None:
        if s.counts is not None:
            return
        out = to_device(s.init_out, torch.long, self.device)
        s.counts = torch.zeros(vocab, device=self.device).index_add_(0, out, torch.ones(len(out), device=self.device))
        s.seen = s.counts > 0
        s.seen[to_device(s.prompt, torch.long, self.device)] = True
        s.prompt = []  # folded into `seen`

    def sample(
        self, logits: torch.Tensor, seq_ids: list[int], masks: TokenMasks | None = None
    ) -> tuple[list[int], list | None]:
        """logits: [B, V] (float32 or the model's dtype), row i for seq_ids[i]; masks: the grammar masks of
        constrained rows. Returns token ids and per-row logprobs (None, or per row None | (logprob,
        [(token_id, logprob), ...])), or None if no row asked."""
        return self.sample_async(logits, seq_ids, masks).to_host().result()

    def sample_async(self, logits: torch.Tensor, seq_ids: list[int], masks: TokenMasks | None = None) -> Sampled:
        """The same, left on the device: no host sync, so the next step can be launched at once."""
        if self.special.isdisjoint(seq_ids) and self.seqs.keys() >= set(seq_ids):
            if masks is not None:  # constrained greedy rows only: mask, then argmax
                logits = apply_token_masks(logits.float(), seq_ids, masks)
            return Sampled(self.argmax(logits), None)  # every row plain greedy: its step count matters to nothing
        states = [self.seqs[i] for i in seq_ids]
        B, V = logits.shape
        want_lp = any(s.params.logprobs is not None for s in states)
        raw_lp = torch.log_softmax(logits.float(), dim=-1) if want_lp else None
        x = logits.float()
        if masks is not None:
            x = apply_token_masks(x, seq_ids, masks)
        x = self._mask_stops(x, states)
        x = self.apply_bias(x, states)
        x = self._penalize(x, states, V)
        greedy = [s.params.greedy for s in states]
        if all(greedy):  # the fast path: no sort, no noise
            tokens = self.argmax(x)
        else:
            tokens = self._draw(x, states, greedy)
        for r, s in enumerate(states):
            s.num_out += 1
            if s.counts is not None:
                t = tokens[r : r + 1]
                s.counts.index_add_(0, t, torch.ones(1, device=s.counts.device))
                s.seen.index_fill_(0, t, True)
        out = Sampled(tokens, [s.params.logprobs for s in states] if want_lp else None)
        if want_lp:
            k = max(s.params.logprobs or 0 for s in states)
            out.chosen = raw_lp.gather(1, tokens[:, None])[:, 0]
            out.top_v, out.top_i = raw_lp.topk(k, dim=-1) if k else (raw_lp[:, :0], raw_lp[:, :0].long())
        return out

    def _mask_stops(self, x: torch.Tensor, states: list[_Seq]) -> torch.Tensor:
        rows, cols = [], []
        for r, s in enumerate(states):
            if s.num_out < s.params.min_tokens:
                ids = [t for t in s.stop_ids if t < x.shape[1]]
                rows += [r] * len(ids)
                cols += ids
        if not rows:
            return x
        x = x.clone()
        x[to_device(rows, torch.long, x.device), to_device(cols, torch.long, x.device)] = float("-inf")
        return x

    def apply_bias(self, x: torch.Tensor, states: list[_Seq]) -> torch.Tensor:
        """logit_bias: one batched add over every biased row's entries (row r of x is states[r]'s; the
        speculative verifier passes a sequence's state once per position it verifies)."""
        rows, cols, vals = [], [], []
        for r, s in enumerate(states):
            if s.bias is not None:
                rows += [r] * len(s.bias[0])
                cols += s.bias[0]
                vals += s.bias[1]
        if not rows:
            return x
        dev = x.device
        idx = (to_device(rows, torch.long, dev), to_device(cols, torch.long, dev))
        return x.index_put(idx, to_device(vals, torch.float32, dev), accumulate=True)

    def _penalize(self, x: torch.Tensor, states: list[_Seq], vocab: int) -> torch.Tensor:
        rows = [r for r, s in enumerate(states) if s.params.has_penalties]
        if not rows:
            return x
        for r in rows:
            self._penalty_state(states[r], vocab)
        ps = [states[r].params for r in rows]
        idx = to_device(rows, torch.long, x.device)
        counts = torch.stack([states[r].counts for r in rows])
        seen = torch.stack([states[r].seen for r in rows])
        col = lambda v: to_device(v, torch.float32, x.device)[:, None]  # noqa: E731
        rep, freq, pres = (
            col([p.repetition_penalty for p in ps]),
            col([p.frequency_penalty for p in ps]),
            col([p.presence_penalty for p in ps]),
        )
        y = x[idx]
        y = torch.where(seen, torch.where(y > 0, y / rep, y * rep), y)
        y = y - freq * counts - pres * (counts > 0).float()
        x = x.clone()
        x[idx] = y
        return x

    def _draw(self, x: torch.Tensor, states: list[_Seq], greedy: list[bool]) -> torch.Tensor:
        dev = x.device
        best = x.argmax(dim=-1)
        temps = to_device([1.0 if g else s.params.temperature for g, s in zip(greedy, states)], torch.float32, dev)
        x = x / temps[:, None]
        V = x.shape[1]
        ks = [min(s.params.top_k, V) if s.params.top_k > 0 else V for s in states]  # V: no top-k
        ps = [s.params.top_p for s in states]
        min_p = [s.params.min_p for s in states]
        if self.fused is not None and all(s.gen is None for s in states) and not any(m > 0 for m in min_p):
            # One fused kernel: top-k mask, softmax, then top-p by rejection sampling (no sort).
            drawn = self.fused.top_k_top_p_sampling_from_logits(
                x, to_device(ks, torch.int32, dev), to_device(ps, torch.float32, dev)
            ).long()
        else:
            probs = filtered_probs(x, ks, ps, min_p)
            noise = torch.empty_like(probs).exponential_()
            for r, s in enumerate(states):
                if s.gen is not None:
                    noise[r].exponential_(generator=s.gen)
            drawn = (probs / noise).argmax(dim=-1)
        return torch.where(to_device(greedy, torch.bool, dev), best, drawn)


class Sampled:
    """One step's draws, on the device until `to_host` starts their copy and `result` reads them."""

    def __init__(self, tokens: torch.Tensor, num_logprobs: list | None):
        self.tokens = tokens
        self.num_logprobs = num_logprobs  # per row: None or how many top logprobs it asked for
        self.chosen = self.top_v = self.top_i = None

    def to_host(self) -> Sampled:
        """Starts non-blocking copies to (pinned) host memory; read them after the step's event."""
        cpu = lambda t: None if t is None else to_host(t)  # noqa: E731
        host = Sampled(cpu(self.tokens), self.num_logprobs)
        host.chosen, host.top_v, host.top_i = cpu(self.chosen), cpu(self.top_v), cpu(self.top_i)
        return host

    def result(self) -> tuple[list[int], list | None]:
        tokens = self.tokens.tolist()
        if self.num_logprobs is None:
            return tokens, None
        chosen, top_v, top_i = self.chosen.tolist(), self.top_v.tolist(), self.top_i.tolist()
        return tokens, [
            None if n is None else (chosen[r], list(zip(top_i[r][:n], top_v[r][:n])))
            for r, n in enumerate(self.num_logprobs)
        ]


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _argmax_for(device: torch.device):
    """Greedy rows' pick: torch's argmax, or on CUDA with Triton the same index from kernels that
    spread a row over many SMs (model/argmax.py), which matters at batch-1 decode."""
    if device.type == "cuda":
        try:
            from nanoslg.model.argmax import argmax_rows  # deferred: imports Triton

            return argmax_rows
        except ImportError:  # no Triton: torch's
            pass
    return lambda x: x.argmax(dim=-1)


def apply_token_masks(x: torch.Tensor, seq_ids: list[int], masks: TokenMasks) -> torch.Tensor:
    """Sets to -inf what each constrained row's grammar forbids (a new tensor: x may be a CUDA graph's
    output). The int32 words are read as little-endian bytes, so token t is bit t % 8 of byte t // 8;
    the bytes unpack to booleans on the device."""
    at = {s: r for r, s in enumerate(seq_ids)}
    rows = [at[s] for s in masks.seq_ids]
    allowed = unpack_mask(masks.bits, x.shape[1], x.device)
    if rows == list(range(x.shape[0])):
        return x.masked_fill(~allowed, float("-inf"))
    idx = to_device(rows, torch.long, x.device)
    x = x.clone()
    x[idx] = x[idx].masked_fill(~allowed, float("-inf"))
    return x


def unpack_mask(bits, vocab: int, dev: torch.device) -> torch.Tensor:
    """llguidance's int32 mask rows [k, words] as booleans [k, vocab] on the device."""
    shifts = _SHIFTS.get(dev)
    if shifts is None:
        shifts = _SHIFTS[dev] = torch.arange(8, dtype=torch.uint8, device=dev)
    packed = to_device(bits, torch.int32, dev).view(torch.uint8)  # [k, 4 * words]
    return ((packed[:, :, None] >> shifts) & 1).view(packed.shape[0], -1)[:, :vocab].bool()


def filtered_probs(x: torch.Tensor, ks: list[int], ps: list[float], min_p: list[float]) -> torch.Tensor:
    """The distribution a row draws from: temperature-scaled logits x [B, V] after top-k, top-p and
    min-p (per row; k == V, p == 1.0, min_p == 0 switch each off). Speculative verification reads the
    same distribution the plain draw samples."""
    dev, V = x.device, x.shape[1]
    if any(k < V for k in ks) or any(p < 1.0 for p in ps):
        x = top_k_top_p(x, to_device(ks, torch.long, dev), to_device(ps, torch.float32, dev))
    probs = x.softmax(dim=-1)
    if any(m > 0 for m in min_p):
        thresh = to_device(min_p, torch.float32, dev)[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < thresh, 0.0)
    return probs


def top_k_top_p(x: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Masks to -inf what falls outside each row's top k and top p nucleus (k: [B] long, p: [B])."""
    srt, idx = x.sort(dim=-1, descending=False)
    kth = srt.gather(1, (x.shape[1] - k).clamp(min=0)[:, None])
    srt = srt.masked_fill(srt < kth, float("-inf"))
    cum = srt.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= (1 - p)[:, None]
    drop[:, -1] = False  # always keep the most likely token
    srt = srt.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(1, idx, srt)
