"""Structured configs: the schema every composed Hydra config is validated against.

Hydra merges each group's YAML into these dataclasses, so an unknown key or a wrong type fails at
compose time with the key's full name. `validate()` then checks values (choices and ranges) and
names the key and the allowed values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from nanoslg.core import registry
from nanoslg.core.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = "demo"
    path: str | None = None  # a Hugging Face checkpoint folder; null with name=demo builds the demo
    shape: str | None = None  # a bundled config.json (e.g. llama3-8b) for load_format=dummy
    load_format: str = "auto"  # auto | safetensors | dummy
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cuda | cpu
    max_model_len: int | None = None
    seed: int = 0  # seeds dummy weights
    # Dummy weights' spread: normal draws N(0, 0.02) (transformers' initializer_range); fan_in draws
    # N(0, 0.5/sqrt(fan_in)), where a random model settles into loops, as a trained one often does on
    # a repetitive text (at 0.02 a 4096-wide model is chaotic and never repeats itself), so prompt
    # lookup has something to find (the speculative-decoding presets).
    dummy_init: str = "normal"
    enforce_eager: bool = False  # true: no CUDA graphs at all (decode graphs need flashinfer on one GPU)
    # Prefill and mixed steps in CUDA graphs cut at each attention call (runtime/piecewise.py): auto (on
    # one GPU, unquantized) or off; up to piecewise_max_tokens tokens a step (null: chosen from the
    # model's size and scheduler.max_num_batched_tokens).
    piecewise_graphs: str = "auto"
    piecewise_max_tokens: int | None = None
    # Random draws: auto (flashinfer's fused top-k/top-p kernel on a GPU where it imports, else torch),
    # torch, or flashinfer. The fused kernel takes batches with no per-request seed and no min_p;
    # the rest fall back to torch. Greedy batches take the argmax either way.
    sampling_kernels: str = "auto"
    # GEMM library on CUDA: auto (cuBLAS), cublas, cublaslt. cuBLASLt chooses an algorithm the first
    # time it meets a shape, and eager prefill steps bring a new token count nearly every step.
    blas: str = "auto"
    tokenizer: str | None = None  # defaults to path
    # Linear-layer weights: none (the checkpoint's dtype), fp8 (float8 weights with per-channel
    # scales, activations quantized per token), awq (4-bit AutoAWQ checkpoints). A checkpoint whose
    # config.json has a quantization_config selects its own method; none follows it.
    quantization: str = "none"


@dataclass
class CacheConfig:
    backend: str = "auto"  # auto | sdpa | paged | flashinfer
    page_size: int = 16
    gpu_memory_utilization: float = 0.9
    max_num_tokens: int | None = None  # KV pool size in tokens; overrides the memory sizing
    cpu_kv_gib: float = 2.0  # KV budget on the CPU
    prefix_caching: bool = True
    # Decode steps whose sequences all share a long cached prefix read it once per step, not once
    # per sequence (paged backends; nanoslg/cache/cascade.py).
    cascade_attention: bool = True
    # The KV pool's element type: auto (the model's dtype) or fp8_e4m3 (one byte per value, so twice
    # the tokens of bf16 in the same memory; per-layer scales from the checkpoint, else 1.0).
    kv_dtype: str = "auto"
    # The sdpa backend's decode attention: auto (the paged Triton kernel where it runs: a CUDA device
    # with Triton, and SM80+ for bf16; else gather), triton, or gather (keys copied out of the pool
    # into batched SDPA calls).
    sdpa_decode: str = "auto"
    # FlashInfer's decode kernel: auto (XQA for an FP8 pool on SM90, else tensor cores from a GQA group
    # of 4, FlashInfer's own rule), tensor_cores, cuda_cores, xqa (TensorRT-LLM's kernel; SM90+, FP8
    # products with an FP8 pool), or fused (decode steps of up to 8 rows: rotary, KV append and
    # attention in our one Triton kernel; the rest as auto).
    flashinfer_decode: str = "auto"
    # A FlashInfer decode step's rotary embedding and KV append: auto (one Triton kernel for both; an
    # FP8 pool's cast included) or off (FlashInfer's kernels).
    fused_rope: str = "auto"
    # A FlashInfer mixed step's leading decode rows: split (through the decode kernel, the prefill
    # chunks through the prefill kernel, two calls a layer) or one (every row through the prefill
    # kernel, one call; cache/flashinfer_step.py says why split).
    mixed_attention: str = "split"


@dataclass
class SchedulerConfig:
    policy: str = "fcfs"  # fcfs | lpm | dfs-weight | random
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    seed: int = 0  # for policy=random
    # Overlap: plan and launch step N+1 while step N runs; a decode feeds the token step N samples,
    # read on the device, so the host never waits for it (parallel=single; tp/pp run without it).
    overlap: bool = True
    # With overlap: plan the step after a decode step shortly before that step ends rather than as it
    # starts, so a request arriving meanwhile joins it (engine/lookahead.py).
    hold_lookahead: bool = False


@dataclass
class ParallelConfig:
    mode: str = "auto"  # auto | single | tp | pp | hybrid (auto chooses the mode and sizes: parallel/auto.py)
    tp_size: int = 1
    pp_size: int = 1
    stage_layers: list | None = None  # layers per PP stage; even split when null
    dist_backend: str = "auto"  # auto | nccl | gloo
    master_addr: str = "127.0.0.1"
    master_port: int = 0  # 0 picks a free port


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_waiting: int = 1024
    shutdown_timeout: float = 30.0
    max_body_bytes: int = 16 * 1024 * 1024
    log_level: str = "info"
    # How tool_choice=auto finds calls in the text: hermes (Qwen, Hermes: <tool_call>{...}</tool_call>)
    # or llama3_json (Llama 3.x: the output is one JSON call); nanoslg/server/tool_parsers/.
    tool_parser: str = "hermes"


@dataclass
class SamplingConfig:
    """Defaults for mode=generate (the server and API take them per request)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False


@dataclass
class BenchConfig:
    workload: str = "offline"  # offline | batch1 | shared_prefix | serving
    name: str | None = None  # a preset's folder under experiments/; null: an ad-hoc run (outputs/bench/<workload>)
    num_requests: int = 256
    input_len_min: int = 100
    input_len_max: int = 1024
    output_len_min: int = 100
    output_len_max: int = 1024
    shared_prefix_len: int = 0
    request_rate: float | None = None  # Poisson arrivals per second (serving); null = all at once
    concurrency: int | None = None  # fixed concurrency (serving)
    seed: int = 0
    ignore_eos: bool = True
    peer: str = "none"  # none | hf
    warmup: int = 1
    output_dir: str | None = None  # null: experiments/ for presets, outputs/bench/ for ad-hoc runs
    extra: dict = field(default_factory=dict)


@dataclass
class NgramConfig:
    """Prompt lookup: the last n tokens (n from max_n down to min_n) are matched against the prompt and
    the output so far; the tokens that followed the latest match are the proposals."""

    min_n: int = 1
    max_n: int = 4


@dataclass
class DraftConfig:
    # A checkpoint with the target's tokenizer and vocabulary. `target`, or the target's own path,
    # runs the target as its own draft on the same weights (dummy weights included).
    path: str | None = None


@dataclass
class SpeculativeConfig:
    method: str = "none"  # none | ngram | draft
    num_tokens: int = 4  # k: proposals per sequence per step, verified in one target forward
    ngram: NgramConfig = field(default_factory=NgramConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)


@dataclass
class Config:
    mode: str = "serve"  # serve | generate | bench
    prompt: str | None = None  # for mode=generate
    chat: bool = False  # mode=generate: apply the chat template
    log_level: str = "INFO"
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    experiment: dict = field(default_factory=dict)  # free-form notes of a preset


CHOICES: dict[str, tuple[str, ...]] = {
    "mode": ("serve", "generate", "bench"),
    "model.load_format": ("auto", "safetensors", "dummy"),
    "model.dummy_init": ("normal", "fan_in"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.device": ("auto", "cuda", "cpu"),
    "model.sampling_kernels": ("auto", "torch", "flashinfer"),
    "model.blas": ("auto", "cublas", "cublaslt"),
    "model.piecewise_graphs": ("auto", "off"),
    "cache.kv_dtype": ("auto", "fp8_e4m3"),
    "cache.sdpa_decode": ("auto", "triton", "gather"),
    "cache.flashinfer_decode": ("auto", "tensor_cores", "cuda_cores", "xqa", "fused"),
    "cache.fused_rope": ("auto", "off"),
    "cache.mixed_attention": ("split", "one"),
    "parallel.dist_backend": ("auto", "nccl", "gloo"),
    "bench.peer": ("none", "hf"),
    "speculative.method": ("none", "ngram", "draft"),
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR"),
}

# (key, lower bound, upper bound or None, lower bound inclusive)
RANGES: list[tuple[str, float, float | None, bool]] = [
    ("cache.page_size", 1, None, True),
    ("cache.gpu_memory_utilization", 0.0, 1.0, False),
    ("cache.cpu_kv_gib", 0.0, None, False),
    ("cache.max_num_tokens", 1, None, True),
    ("scheduler.max_num_seqs", 1, None, True),
    ("scheduler.max_num_batched_tokens", 1, None, True),
    ("parallel.tp_size", 1, None, True),
    ("parallel.pp_size", 1, None, True),
    ("model.max_model_len", 1, None, True),
    ("model.piecewise_max_tokens", 1, None, True),
    ("server.port", 0, 65535, True),
    ("server.max_waiting", 1, None, True),
    ("server.shutdown_timeout", 0.0, None, True),
    ("bench.num_requests", 1, None, True),
    ("speculative.num_tokens", 1, 64, True),
    ("speculative.ngram.min_n", 1, None, True),
    ("speculative.ngram.max_n", 1, None, True),
]


def register_schema() -> None:
    """Registers the schema with Hydra's ConfigStore (conf/config.yaml lists it first)."""
    ConfigStore.instance().store(name="nanoslg_schema", node=Config)


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key)


def check_choice(key: str, value: Any) -> None:
    """Raises the ConfigError naming `key` and its allowed values (CHOICES) when `value` is not one."""
    allowed = CHOICES[key]
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; allowed: {', '.join(allowed)}")


def validate(cfg: DictConfig) -> Config:
    """Checks choices and ranges, and returns the typed config object."""
    for key in CHOICES:
        check_choice(key, _get(cfg, key))
    for key, lo, hi, lo_incl in RANGES:
        value = _get(cfg, key)
        if value is None:
            continue
        bad = value < lo if lo_incl else value <= lo
        if bad or (hi is not None and value > hi):
            lo_s = f"{'>=' if lo_incl else '>'} {lo}"
            rng = f"{lo_s} and <= {hi}" if hi is not None else lo_s
            raise ConfigError(f"{key}={value!r} is out of range; it must be {rng}")
    _check_registries(cfg)
    mode, tp, pp = cfg.parallel.mode, cfg.parallel.tp_size, cfg.parallel.pp_size
    expect = {"auto": tp == 1 and pp == 1, "single": tp == 1 and pp == 1, "tp": pp == 1, "pp": tp == 1, "hybrid": True}
    if not expect.get(mode, True):
        raise ConfigError(
            f"parallel.mode={mode!r} does not fit parallel.tp_size={tp}, parallel.pp_size={pp}; "
            "single needs both 1, tp needs pp_size=1, pp needs tp_size=1, hybrid takes any, and auto "
            "chooses both (give parallel=tp|pp|hybrid to set them)"
        )
    spec = cfg.speculative
    if spec.ngram.min_n > spec.ngram.max_n:
        raise ConfigError(
            f"speculative.ngram.min_n={spec.ngram.min_n} is over speculative.ngram.max_n={spec.ngram.max_n}"
        )
    if spec.method == "draft" and not spec.draft.path:
        raise ConfigError("speculative=draft needs speculative.draft.path (a checkpoint folder, or `target`)")
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config)  # guaranteed by the schema merge, not reachable by users
    return obj


def _check_registries(cfg: DictConfig) -> None:
    """Names that select a plugin, checked against what the plugins declare (none is imported)."""
    if cfg.cache.backend != "auto":
        registry.CACHE_BACKENDS.check(cfg.cache.backend)
    registry.SCHEDULERS.check(cfg.scheduler.policy)
    if cfg.parallel.mode != "auto":  # resolved from the model and the GPUs (parallel/auto.py)
        registry.PARALLEL.check(cfg.parallel.mode)
    registry.BENCHMARKS.check(cfg.bench.workload)
    quant = cfg.model.quantization
    if quant != "none" and quant not in registry.QUANTIZATION:
        allowed = ", ".join(["none", *registry.QUANTIZATION.names()])
        raise ConfigError(f"model.quantization={quant!r} is not allowed; allowed: {allowed}")
    registry.TOOL_PARSERS.check(cfg.server.tool_parser)
