"""Verification of speculative proposals, so that what is emitted is exactly what the target would emit.

Greedy rows keep the longest prefix of proposals equal to the target's argmax, then add the target's
own argmax where they first differ (or after the last proposal). Sampled rows follow the rule of
speculative sampling (Leviathan et al. 2023; Chen et al. 2023): a proposal d drawn from q is kept
with probability min(1, p(d) / q(d)); at the first rejection the token is drawn from max(0, p - q)
renormalised, and when every proposal is kept, from p at the position after the last. The emitted
tokens are then distributed exactly as the target's own draws. An n-gram proposal is a point mass
(q = one-hot(d)): d is kept with probability p(d), and a rejection draws from p without d.

p is the distribution the plain sampler draws from (grammar mask, logit_bias, temperature, top-k,
top-p, min-p), so a speculating sequence samples from the same distribution as one that does not. A
constrained sequence brings one grammar mask per position (the grammar's state after the proposals
before it): a proposal its grammar refuses has p = 0 there and is never kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanoslg.model.sampler import Sampler, filtered_probs, unpack_mask


@dataclass
class SpecRow:
    """One speculating sequence: its proposals and the distributions they were drawn from."""

    seq_id: int
    draft: list[int]
    q: torch.Tensor | None = None  # [len(draft), V] draft-model probabilities; None: a point mass


def rejection_sample(
    p: torch.Tensor, q: torch.Tensor, draft: torch.Tensor, u: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched rule. p: [B, m+1, V] target probabilities at each proposal and after the last; q: [B, m, V]
    the proposal distributions; draft: [B, m] the proposals (drawn from q); u: [B, m] uniform in [0, 1);
    noise: [B, V] Exp(1) draws for the final token. Returns (kept [B]: proposals accepted, token [B]:
    the token drawn after them)."""
    B, m = draft.shape
    pd = p[:, :m].gather(2, draft[..., None])[..., 0]
    qd = q.gather(2, draft[..., None])[..., 0]
    ok = u * qd < pd  # u < p / q: kept with probability min(1, p / q)
    kept = ok.long().cumprod(dim=1).sum(dim=1)
    rows = torch.arange(B, device=p.device)
    p_at = p[rows, kept]
    q_at = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)[rows, kept]  # q is 0 after the last proposal
    resid = (p_at - q_at).clamp(min=0)
    # p == q leaves nothing; a rejection then has probability 0, so p itself is the safe stand-in.
    resid = torch.where(resid.sum(dim=-1, keepdim=True) > 0, resid, p_at)
    return kept, (resid / noise).argmax(dim=-1)  # the exponential race draws from resid, unnormalised


def row_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    """The sampler's distribution of each row (params[i]: its SamplingParams, not greedy)."""
    V = logits.shape[1]
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=logits.device)
    ks = [min(p.top_k, V) if p.top_k > 0 else V for p in params]
    return filtered_probs(logits.float() / temps[:, None], ks, [p.top_p for p in params], [p.min_p for p in params])


def constrain(
    sampler: Sampler, logits: torch.Tensor, rows: list[SpecRow], offsets: list[int], masks: dict
) -> torch.Tensor:
    """The logits with each sequence's grammar masks (masks: seq id -> int32 [len(draft) + 1, words])
    and its logit_bias applied at every position, as the plain sampler applies them to one row."""
    states = [sampler.seqs[r.seq_id] for r in rows]
    if not masks and all(s.bias is None for s in states):
        return logits
    x = logits.float()
    for r, o in zip(rows, offsets):
        bits = masks.get(r.seq_id)
        if bits is not None:
            n = len(r.draft) + 1
            x[o : o + n] = x[o : o + n].masked_fill(~unpack_mask(bits, x.shape[1], x.device), float("-inf"))
    per_row = [s for r, s in zip(rows, states) for _ in range(len(r.draft) + 1)]
    return sampler.apply_bias(x, per_row)


def verify(
    sampler: Sampler, logits: torch.Tensor, rows: list[SpecRow], masks: dict | None = None
) -> tuple[list[list[int]], list]:
    """logits: [sum(len(r.draft) + 1), V], each sequence's rows in order; masks: grammar masks of
    constrained sequences (TokenMasks.spec). Returns, per sequence, the tokens it emits (the accepted
    proposals, then the target's own token) and, per sequence, None or the logprob entry of each (the
    sampler's format, from the raw logits)."""
    out: list[list[int] | None] = [None] * len(rows)
    offsets, at = [], 0
    for r in rows:
        offsets.append(at)
        at += len(r.draft) + 1
    states = [sampler.seqs[r.seq_id] for r in rows]
    raw, logits = logits, constrain(sampler, logits, rows, offsets, masks or {})
    greedy = [i for i, s in enumerate(states) if s.params.greedy]
    if greedy:
        best = logits.argmax(dim=-1).tolist()
        for i in greedy:
            d, o = rows[i].draft, offsets[i]
            n = 0
            while n < len(d) and best[o + n] == d[n]:
                n += 1
            out[i] = d[:n] + [best[o + n]]
    dev, V = logits.device, logits.shape[1]
    for i, (r, s) in enumerate(zip(rows, states)):
        if out[i] is not None:
            continue
        m, o = len(r.draft), offsets[i]
        p = row_probs(logits[o : o + m + 1], [s.params] * (m + 1))
        draft = torch.tensor(r.draft, dtype=torch.long, device=dev)
        q = r.q if r.q is not None else torch.nn.functional.one_hot(draft, V).float()
        u = torch.rand(m, generator=s.gen, device=dev)
        noise = torch.empty(V, device=dev).exponential_(generator=s.gen)
        kept, tok = rejection_sample(p[None], q[None], draft[None], u[None], noise[None])
        n = int(kept)
        out[i] = r.draft[:n] + [int(tok)]
    for s, toks in zip(states, out):
        s.num_out += len(toks)
    lps = [
        None if s.params.logprobs is None else logprobs_of(raw[o : o + len(t)], t, s.params.logprobs)
        for s, t, o in zip(states, out, offsets)
    ]
    return out, lps


def logprobs_of(logits: torch.Tensor, tokens: list[int], k: int) -> list:
    """Row j's entry for tokens[j]: its logprob and the top k (the raw logits' log_softmax, as the
    sampler reports them). Each emitted token's row is the one its accepted prefix led to."""
    raw = torch.log_softmax(logits.float(), dim=-1)
    chosen = raw.gather(1, torch.tensor(tokens, device=raw.device)[:, None])[:, 0].tolist()
    if not k:
        return [(c, []) for c in chosen]
    top_v, top_i = raw.topk(k, dim=-1)
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, top_i.tolist(), top_v.tolist())]
