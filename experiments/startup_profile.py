"""Where a cold start's engine build goes (W8): each import and phase timed in one fresh process,
then build_engine under cProfile, its functions with the most cumulative and own time.

    python experiments/startup_profile.py +experiment=serving-llama3-8b [overrides]

Run it in a fresh process on the device: a second build in the same process finds CUDA, cuBLAS and
FlashInfer's modules already loaded.
"""

import cProfile
import sys
import time

T0 = time.perf_counter()


def mark(what: str, since: float) -> float:
    now = time.perf_counter()
    print(f"{now - T0:7.2f} s  +{now - since:5.2f} s  {what}", flush=True)
    return now


def main(overrides: list[str]) -> None:
    t = T0
    from nanoslg.core.compose import compose_config, setup_logging

    t = mark("import hydra and the config schema", t)
    cfg, _ = compose_config(overrides)
    t = mark("compose the config", t)
    import torch

    t = mark("import torch", t)
    if torch.cuda.is_available():
        torch.cuda.init()
        torch.empty(1, device="cuda")
        t = mark("CUDA context", t)
        import flashinfer  # noqa: F401

        t = mark("import flashinfer", t)
    import transformers  # noqa: F401

    t = mark("import transformers", t)
    from nanoslg.server.serve import build_engine

    t = mark("import nanoslg.server.serve (the rest of the server: litestar, uvicorn)", t)
    setup_logging(cfg.log_level)
    prof = cProfile.Profile()
    prof.enable()
    engine = build_engine(cfg)
    prof.disable()
    t = mark("build_engine, under cProfile", t)
    print(f"phases: {engine.info.get('startup_s')}")
    from host_profile import _table as table  # here, not above: it imports the engine, which the timings above time

    for key in ("cumulative", "tottime"):
        print(f"\n== build_engine by {key} ==\n" + table(prof, key, 40))


if __name__ == "__main__":
    main(sys.argv[1:])
