"""What run.py does for each mode, after Hydra composed the config."""

from __future__ import annotations

import logging
import sys

from omegaconf import DictConfig

from nanoslg.core.compose import setup_logging
from nanoslg.core.config import validate
from nanoslg.core.errors import CONFIG_ERROR_EXIT, ConfigError, RequestError

log = logging.getLogger("nanoslg")


def run(node: DictConfig) -> int:
    # Each mode imports only what it runs: a torchrun worker needs no server, serving no benchmarks.
    try:
        cfg = validate(node)
        if cfg.mode != "generate" and (cfg.prompt is not None or cfg.chat):
            # As `vllm serve --prompt` is an error: a key that would do nothing is a mistake.
            raise ConfigError(
                f"prompt and chat are read by mode=generate only (this is mode={cfg.mode}); for one completion "
                "run `python run.py mode=generate prompt=...`, and send prompts to a server over HTTP"
            )
        setup_logging(cfg.log_level)
        from nanoslg.parallel.worker import maybe_run_worker

        if maybe_run_worker(cfg):  # a torchrun rank > 0: it served as a worker until rank 0 ended
            return 0
        if cfg.mode == "serve":
            from nanoslg.server.serve import serve

            return serve(cfg) or 0
        if cfg.mode == "generate":
            return generate(cfg)
        from nanoslg.bench.runner import run_bench

        run_bench(cfg, node)
        return 0
    except (ConfigError, RequestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return CONFIG_ERROR_EXIT


def generate(cfg) -> int:
    # Deferred like the other modes' imports in run(): only mode=generate loads the LLM API here.
    from nanoslg.core.sampling_params import SamplingParams
    from nanoslg.llm import LLM

    if not cfg.prompt:
        raise ConfigError('mode=generate needs prompt="..."')
    s = cfg.sampling
    params = SamplingParams(
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=s.min_p,
        seed=s.seed,
        ignore_eos=s.ignore_eos,
    )
    llm = LLM(config=cfg)
    try:
        prompt = cfg.prompt
        if cfg.chat and llm.tokenizer is not None:
            prompt = llm.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        out = llm.generate(prompt, params)[0]
        print(out.text)
    finally:
        llm.shutdown()
    return 0
