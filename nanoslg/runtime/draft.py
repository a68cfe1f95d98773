"""speculative=draft: a second, smaller model proposes each speculating sequence's next k tokens.

The draft runs on the target's rank (parallel=single only) with its own KV pool: an sdpa backend,
whose pages are private per sequence, so the draft needs no block tables and no prefix tree. The
scheduler keeps the draft's accounting (scheduler/speculative.py) and sends, per speculating
sequence, the tokens the draft has not read yet (SeqStep.draft_ids from draft_start). Proposing is k
eager forwards (rounds): the first reads those tokens, each later one the draws of the one before,
left on the device, so the host reads the proposals once, at the end. Rejected proposals' KV stays
in the pool until overwritten: the next step's first round starts at the first position that was
not accepted.

A draft path of `target` (or the target's own folder) runs the target model object itself as the
draft, so it has exactly the target's weights, dummy ones included.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import torch

from nanoslg.cache.backend import KVSpec
from nanoslg.cache.sdpa import SdpaBackend
from nanoslg.core.config import Config
from nanoslg.core.errors import ConfigError
from nanoslg.core.plan import PLACEHOLDER, SeqStep, StepPlan
from nanoslg.core.tensors import STAGING, to_device
from nanoslg.model.checkpoint import Checkpoint, resolve_checkpoint
from nanoslg.model.loader import load_model
from nanoslg.model.sampler import Sampler
from nanoslg.model.spec_sampling import row_probs

log = logging.getLogger("nanoslg.build")


class DraftRunner:
    def __init__(self, model: torch.nn.Module, backend: SdpaBackend, sampler: Sampler, device: torch.device):
        self.model, self.backend, self.sampler, self.device = model, backend, sampler, device
        self.elapsed = 0.0  # seconds the last propose took (it ends reading the proposals: the device's too)

    @property
    def spec(self) -> KVSpec:
        return self.backend.spec

    def release(self, freed: list[int]) -> None:
        """Finished or preempted sequences: their draft KV goes too."""
        if freed:
            self.backend.prepare(StepPlan(-1, [], freed=list(freed)))

    @torch.inference_mode()
    def propose(self, plan: StepPlan) -> dict[int, torch.Tensor]:
        """Fills the proposals of the plan's speculating sequences in place; returns, for sampled
        requests, the draft's probabilities each proposal was drawn from ([spec, V])."""
        specs = [s for s in plan.seqs if s.spec and s.draft_ids is not None]
        self.elapsed = 0.0
        if not specs:
            return {}
        t0 = time.perf_counter()
        probs: dict[int, list[torch.Tensor]] = {s.seq_id: [] for s in specs}
        rounds: list[tuple[list[SeqStep], torch.Tensor]] = []  # (sequences, their draws on the device)
        active = specs
        steps = [SeqStep(s.seq_id, list(s.draft_ids), s.draft_start, True) for s in specs]
        ids = to_device([t for s in steps for t in s.token_ids], torch.long, self.device)
        for j in range(max(s.spec for s in specs)):
            tokens, qs = self._round(steps, ids)
            rounds.append((active, tokens))
            for s, q in zip(active, qs):
                if q is not None:
                    probs[s.seq_id].append(q)
            keep = [i for i, s in enumerate(active) if s.spec > j + 1]
            if not keep:
                break
            # The next round reads this one's draws where they are: no wait for the device in between.
            ids = tokens if len(keep) == len(active) else tokens[to_device(keep, torch.long, self.device)]
            active = [active[i] for i in keep]
            steps = [SeqStep(s.seq_id, [PLACEHOLDER], s.start + j + 1, True) for s in active]
        drawn = torch.cat([t for _, t in rounds]).tolist()  # the one read of the proposals
        at = 0
        for r, (seqs, _) in enumerate(rounds):  # round r drew proposal r + 1 of each sequence in it
            for i, s in enumerate(seqs):
                s.token_ids[r + 1] = drawn[at + i]
            at += len(seqs)
        self.elapsed = time.perf_counter() - t0
        return {sid: torch.stack(q) for sid, q in probs.items() if q}

    def _round(self, steps: list[SeqStep], ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """One draft forward over `steps` (input ids on the device); each sequence's next token, left on
        the device, drawn as the target would draw it (greedy: argmax; sampled: from the draft's own
        distribution under the same parameters)."""
        STAGING.next_step()
        ctx = self.backend.prepare(StepPlan(-1, steps))
        hidden = self.model(ids, ctx.positions, ctx)
        ends, at = [], 0
        for s in steps:
            at += len(s.token_ids)
            ends.append(at - 1)
        logits = self.model.compute_logits(hidden[to_device(ends, torch.long, self.device)]).float()
        states = [self.sampler.seqs[s.seq_id] for s in steps]
        tokens = logits.argmax(dim=-1)
        qs: list[torch.Tensor | None] = [None] * len(steps)
        sampled = [i for i, st in enumerate(states) if not st.params.greedy]
        if sampled:
            p = row_probs(logits[sampled], [states[i].params for i in sampled])
            for r, i in enumerate(sampled):
                noise = torch.empty_like(p[r]).exponential_(generator=states[i].gen)
                tokens[i] = (p[r] / noise).argmax()
                qs[i] = p[r]
        return tokens, qs


def build_drafter(cfg: Config, ckpt: Checkpoint, target: torch.nn.Module, sampler: Sampler) -> DraftRunner:
    """Loads the draft (or shares the target's model), checks its vocabulary, and makes its KV backend
    (its pool is allocated with the target's, as many pages)."""
    path = cfg.speculative.draft.path
    same = path == "target" or os.path.realpath(os.path.expanduser(path)) == os.path.realpath(ckpt.path)
    param = next(target.parameters())
    dtype, device = param.dtype, param.device
    if same:
        model, args = target, ckpt.args
        log.info("speculative=draft: the target is its own draft (shared weights)")
    else:
        dcfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=path, quantization="none"))
        dck = resolve_checkpoint(dcfg)
        args = dck.args
        if args.vocab_size != ckpt.args.vocab_size:
            raise ConfigError(
                f"speculative.draft.path={path!r} has a vocabulary of {args.vocab_size} tokens, the target "
                f"{ckpt.args.vocab_size}: a draft must share the target's tokenizer and vocabulary"
            )
        max_len = cfg.model.max_model_len or ckpt.args.max_position_embeddings
        if args.max_position_embeddings < max_len:
            raise ConfigError(
                f"speculative.draft.path={path!r} reaches {args.max_position_embeddings} positions, the target "
                f"{max_len}: lower model.max_model_len or pick a draft with the target's context"
            )
        fmt = "dummy" if cfg.model.load_format == "dummy" else "safetensors"
        model = load_model(
            dck.path,
            args,
            dtype=dtype,
            device=device,
            load_format=fmt,
            seed=cfg.model.seed,
            dummy_init=cfg.model.dummy_init,
        )
        log.info("speculative=draft: draft %s (%s, %d layers)", dck.path, args.architecture, args.num_layers)
    spec = KVSpec(args.num_layers, args.num_kv_heads, args.head_dim, dtype, device, args.num_heads)
    return DraftRunner(model, SdpaBackend(spec, cfg.cache.page_size), sampler, device)
