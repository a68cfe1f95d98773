"""`parallel=auto` (the default): single, tp, pp or hybrid, and their sizes, from what the model needs
and what the machine has; the log says what was chosen and why.

`choose` is a pure function of the model's needs (weights, and the KV of one full context) and the
machine (GPUs per node, their usable memory, the node count and ranks under torchrun):

- no GPU: single (the CPU);
- torchrun started several ranks: all of them take part, tensor parallel within a node (its GPUs
  share the fast links) and pipeline stages across nodes;
- one GPU holds it: single;
- else the fewest GPUs that hold it: tensor parallel where the model's heads split that way, else
  pipeline stages (with tensor parallel inside each where possible).

Like `cache=auto`, it is resolved before the registry lookup (`resolve_parallel`), not registered as
a strategy: torchrun's worker ranks and the bench need the sizes before any executor exists, and
they must all reach the same choice from the same inputs.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from nanoslg.core.config import Config
from nanoslg.core.errors import ConfigError
from nanoslg.model.checkpoint import Checkpoint
from nanoslg.model.loader import resolve_dtype

log = logging.getLogger("nanoslg.parallel")

GiB = 2**30
# Of each GPU's usable memory (cache.gpu_memory_utilization), the share weights and the KV of one
# context may take; the rest is for activations, CUDA graphs and the sampler.
FIT_SHARE = 0.9


@dataclasses.dataclass(frozen=True)
class ModelNeeds:
    weight_bytes: int
    kv_bytes_per_token: int  # every layer and KV head
    max_model_len: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int | None = None

    @property
    def total_bytes(self) -> int:
        """Weights plus the KV of one sequence of the full context: the least a run must hold."""
        return self.weight_bytes + self.kv_bytes_per_token * self.max_model_len


@dataclasses.dataclass(frozen=True)
class Machine:
    gpus: int  # visible on this node
    gpu_bytes: int = 0  # usable memory of one GPU
    nodes: int = 1
    world: int | None = None  # ranks torchrun started (WORLD_SIZE), None without torchrun


@dataclasses.dataclass(frozen=True)
class Choice:
    mode: str
    tp: int
    pp: int
    why: str


def _mode(tp: int, pp: int) -> str:
    return {(True, True): "single", (False, True): "tp", (True, False): "pp"}.get((tp == 1, pp == 1), "hybrid")


def tp_splits(m: ModelNeeds, tp: int) -> bool:
    """Whether the model's attention heads, KV heads and MLP split over tp ranks (launch.check_layout)."""
    kv_ok = m.num_kv_heads % tp == 0 or tp % m.num_kv_heads == 0
    return m.num_heads % tp == 0 and kv_ok and (m.intermediate_size is None or m.intermediate_size % tp == 0)


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def choose(m: ModelNeeds, machine: Machine) -> Choice:
    need = (
        f"the model needs {_gib(m.total_bytes)} (weights {_gib(m.weight_bytes)} + KV of one "
        f"{m.max_model_len}-token context {_gib(m.kv_bytes_per_token * m.max_model_len)})"
    )
    if machine.gpus == 0:
        return Choice("single", 1, 1, "no CUDA device: one process on the CPU")
    budget = machine.gpu_bytes * FIT_SHARE

    def fits(ranks: int) -> bool:
        return m.total_bytes / ranks <= budget

    def layouts(ranks: int, max_tp: int) -> list[tuple[int, int]]:
        """(tp, pp) with tp * pp == ranks, the widest tensor parallel first."""
        return [
            (tp, ranks // tp)
            for tp in range(min(ranks, max_tp), 0, -1)
            if ranks % tp == 0 and tp_splits(m, tp) and ranks // tp <= m.num_layers
        ]

    if machine.world is not None and machine.world > 1:
        per_node = max(machine.world // max(machine.nodes, 1), 1)
        options = layouts(machine.world, per_node)
        if not options:
            raise ConfigError(
                f"parallel=auto: no tp x pp layout of the {machine.world} torchrun ranks fits the model's "
                f"{m.num_heads} heads and {m.num_layers} layers; set parallel.mode, tp_size and pp_size"
            )
        tp, pp = options[0]
        if not fits(machine.world):
            raise ConfigError(f"parallel=auto: {need}; {machine.world} GPUs of {_gib(budget)} usable do not hold it")
        return Choice(
            _mode(tp, pp),
            tp,
            pp,
            f"torchrun started {machine.world} ranks on {machine.nodes} node(s): tensor parallel {tp} within a "
            f"node, {pp} pipeline stage(s); {need}",
        )
    if fits(1):
        return Choice("single", 1, 1, f"{need}; one GPU holds it ({_gib(budget)} usable)")
    fewest = f"{need}; one GPU holds {_gib(budget)}, so the fewest GPUs that hold it"
    for ranks in range(2, machine.gpus + 1):  # tensor parallel first: every step stays on all GPUs
        if fits(ranks) and tp_splits(m, ranks):
            return Choice("tp", ranks, 1, f"{fewest}: {ranks}, tensor parallel")
    for ranks in range(2, machine.gpus + 1):  # the heads do not split that way: pipeline stages
        options = layouts(ranks, ranks) if fits(ranks) else []
        if options:
            tp, pp = options[0]
            return Choice(
                _mode(tp, pp),
                tp,
                pp,
                f"{fewest}: {ranks}, as {pp} stages (tensor parallel {tp} is what its heads allow)",
            )
    raise ConfigError(
        f"parallel=auto: {need}, but the {machine.gpus} visible GPUs hold {_gib(budget)} each; lower "
        "model.max_model_len, use more GPUs (torchrun across nodes), or set parallel.mode yourself"
    )


def model_needs(cfg: Config, ckpt: Checkpoint, device: torch.device) -> ModelNeeds:
    """What a checkpoint needs, from its config.json and the dtype it will run in."""
    a = ckpt.args
    dtype, _ = resolve_dtype(cfg.model.dtype, a, device)
    elem = torch.empty((), dtype=dtype).element_size()
    h, q, kv = a.hidden_size, a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * a.intermediate_size + 2 * h
    params = a.vocab_size * h * (1 if a.tie_word_embeddings else 2) + a.num_layers * per_layer + h
    max_len = cfg.model.max_model_len or a.max_position_embeddings
    return ModelNeeds(
        weight_bytes=params * elem,
        kv_bytes_per_token=2 * a.num_layers * kv * elem,
        max_model_len=max_len,
        num_layers=a.num_layers,
        num_heads=a.num_heads,
        num_kv_heads=a.num_kv_heads,
        intermediate_size=a.intermediate_size,
    )


def this_machine(cfg: Config) -> Machine:
    """The GPUs visible here, the usable memory of the smallest, and torchrun's ranks and nodes."""
    if cfg.model.device == "cpu" or not torch.cuda.is_available():
        return Machine(gpus=0)
    n = torch.cuda.device_count()
    smallest = min(torch.cuda.get_device_properties(i).total_memory for i in range(n))
    env = os.environ
    world = int(env["WORLD_SIZE"]) if "WORLD_SIZE" in env and "RANK" in env else None
    local = int(env.get("LOCAL_WORLD_SIZE", n)) if world is not None else n
    nodes = max(world // max(local, 1), 1) if world is not None else 1
    return Machine(n, int(smallest * cfg.cache.gpu_memory_utilization), nodes, world)


def resolve_parallel(cfg: Config, ckpt: Checkpoint) -> Config:
    """The config with parallel.mode=auto replaced by the chosen mode and sizes (others unchanged)."""
    if cfg.parallel.mode != "auto":
        return cfg
    machine = this_machine(cfg)
    device = torch.device("cuda" if machine.gpus else "cpu")
    c = choose(model_needs(cfg, ckpt, device), machine)
    log.info("parallel=auto chose %s (tp=%d, pp=%d): %s", c.mode, c.tp, c.pp, c.why)
    par = dataclasses.replace(cfg.parallel, mode=c.mode, tp_size=c.tp, pp_size=c.pp)
    return dataclasses.replace(cfg, parallel=par)
