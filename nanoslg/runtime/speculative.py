"""A verify step's sampling: plain rows sample as usual, speculating rows go through verification.

The logits hold one row per plain sampled sequence and spec + 1 rows per speculating one, in plan
order (ModelRunner.inputs). Verification decides how many proposals each sequence keeps on the host,
so the step's result is complete when the launch returns.
"""

from __future__ import annotations

import torch

from nanoslg.core.plan import StepPlan, StepResult
from nanoslg.model.sampler import Sampler
from nanoslg.model.spec_sampling import SpecRow, verify


def verify_step(sampler: Sampler, plan: StepPlan, logits: torch.Tensor, drafts: dict | None) -> StepResult:
    """drafts: seq id -> the draft model's probabilities of its proposals (sampled requests of
    speculative=draft); the others' proposals are point masses."""
    plain_rows, plain_ids, spec_rows, specs, order = [], [], [], [], []
    r = 0
    for s in plan.seqs:
        if not s.sample:
            continue
        order.append(s.seq_id)
        if s.spec:
            spec_rows.extend(range(r, r + s.spec + 1))
            specs.append(SpecRow(s.seq_id, s.token_ids[1:], (drafts or {}).get(s.seq_id)))
        else:
            plain_rows.append(r)
            plain_ids.append(s.seq_id)
        r += s.spec + 1
    emitted: dict[int, list[int]] = {}
    lps: dict[int, object] = {}  # the first emitted token's logprob entry, where asked
    more_lps: dict[int, list] = {}  # speculating rows: the entries of the tokens after it
    if plain_ids:
        dev = logits.device
        # Read from the device directly (a blocking read): the verify step needs the host anyway.
        masks = plan.masks if plan.masks is not None and plan.masks.seq_ids else None
        sampled = sampler.sample_async(logits[torch.tensor(plain_rows, device=dev)], plain_ids, masks)
        tokens, logprobs = sampled.result()
        for i, (sid, tok) in enumerate(zip(plain_ids, tokens)):
            emitted[sid] = [tok]
            lps[sid] = logprobs[i] if logprobs is not None else None
    if specs:
        rows = logits[torch.tensor(spec_rows, device=logits.device)]
        tokens, spec_lps = verify(sampler, rows, specs, plan.masks.spec if plan.masks is not None else None)
        for row, toks, lp in zip(specs, tokens, spec_lps):
            emitted[row.seq_id] = toks
            if lp is not None:
                lps[row.seq_id], more_lps[row.seq_id] = lp[0], lp[1:]
    first = [emitted[sid][0] for sid in order]
    more = [emitted[sid][1:] for sid in order]
    if not any(v is not None for v in lps.values()):
        return StepResult(plan.step_id, order, first, None, more)
    later = [more_lps.get(sid) or [None] * len(m) for sid, m in zip(order, more)]
    return StepResult(plan.step_id, order, first, [lps.get(sid) for sid in order], more, later)
