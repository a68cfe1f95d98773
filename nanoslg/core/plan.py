"""A step's plan: what every rank needs to run one forward, and nothing more.

It is plain data (ints and lists) so the parallel strategies can send it to other ranks cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nanoslg.core.sampling_params import SamplingParams

# Overlap scheduling: a decode whose input is the token this sequence samples in the step still in
# flight. The runner reads that token on the device, so the host never waits for it.
PLACEHOLDER = -1


@dataclass(slots=True)
class SeqStep:
    seq_id: int
    token_ids: list[int]  # the new tokens fed this step (a prefill chunk, or one decode token / PLACEHOLDER)
    start: int  # position of token_ids[0]; equals the number of tokens already in the KV cache
    sample: bool  # sample a token after this chunk (it reaches the end of the known tokens)
    block_table: list[int] | None = None  # paged managers: the sequence's pages, in order
    # Speculative decoding: the last `spec` of token_ids are proposals, verified against the logits of
    # all spec + 1 positions (a draft model's are PLACEHOLDERs its runner fills before the step).
    spec: int = 0
    # speculative=draft: the tokens the draft model has not read yet, from position draft_start (the
    # last of them is token_ids[0]); its KV before draft_start is in the draft's pool.
    draft_ids: list[int] | None = None
    draft_start: int = 0


@dataclass
class NewSeq:
    """Sent once, when a sequence first samples: what the sampler keeps per sequence."""

    seq_id: int
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # non-empty after a preemption: penalties must see them
    stop_ids: list[int]  # masked while fewer than min_tokens were generated


@dataclass
class TokenMasks:
    """The grammar masks of the constrained sequences that sample in a step (llguidance's layout):
    row i allows token t for seq_ids[i] iff bit t % 32 of word bits[i, t // 32] is set."""

    seq_ids: list[int]
    bits: Any  # numpy int32 [len(seq_ids), ceil(vocab / 32)]
    # Speculating sequences (not in seq_ids): seq id -> int32 [proposals + 1, words], row j the mask
    # after the first j proposals (all ones past a proposal the grammar refuses: never read).
    spec: dict[int, Any] = field(default_factory=dict)


@dataclass
class StepPlan:
    step_id: int
    seqs: list[SeqStep]
    new_seqs: list[NewSeq] = field(default_factory=list)
    freed: list[int] = field(default_factory=list)  # seq ids whose KV is gone (finished or preempted)
    finished: list[int] = field(default_factory=list)  # seq ids that are done: drop sampler state too
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src page, dst page) before the step
    # The scheduler's note that every sequence feeds one token and samples it; None: not known.
    decode: bool | None = None
    masks: TokenMasks | None = None  # grammar masks of constrained rows, known when the plan was made
    # Overlap: a constrained sequence's mask depends on the token of the step still in flight, so this
    # step stops after its logits and samples once the engine hands the masks over (executor.sample).
    sample_later: bool = False
    spec: bool = False  # some sequence verifies proposals (SeqStep.spec): the runner returns several tokens
    # speculative=draft with constrained rows: their masks need the draft's proposals, so the runner
    # calls this once it has them (one GPU only) and adds what it returns to masks.spec.
    spec_masks: Any = None

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)

    @property
    def is_decode(self) -> bool:
        """One new token per sequence (a decode step; some may not sample, e.g. pipeline stages)."""
        if self.decode:
            return True
        return all(len(s.token_ids) == 1 for s in self.seqs)

    @property
    def is_sampled_decode(self) -> bool:
        """A decode step where every sequence samples: what a captured decode graph replays."""
        if self.decode is not None:
            return self.decode
        return bool(self.seqs) and all(len(s.token_ids) == 1 and s.sample for s in self.seqs)


@dataclass
class StepResult:
    step_id: int
    seq_ids: list[int]  # the sequences that sampled, in plan order
    token_ids: list[int]
    logprobs: list | None = None  # per sampled seq: None or (logprob, [(id, logprob), ...])
    # Speculative steps: per sampled seq, the tokens it emits after token_ids[i] (accepted proposals
    # past the first, then the target's own token); None when no sequence speculated.
    more_tokens: list[list[int]] | None = None
    more_logprobs: list[list] | None = None  # and their logprob entries (as `logprobs`), where asked
    draft_s: float = 0.0  # speculative=draft: seconds the draft model took to propose, within the step
    device_s: float | None = None  # the step's time on the device, from its launch's first event to its last
