"""`python run.py` as a newcomer meets it: config mistakes (all one exit code, each naming the key),
a busy port found before the model loads, a prompt given to the server, what the start-up log says,
and a script that ends without llm.shutdown()."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanoslg.core.errors import CONFIG_ERROR_EXIT

REPO = Path(__file__).resolve().parent.parent


def run_py(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "run.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "args, says",
    [
        (["scheduler.max_num_seq=4"], "did you mean scheduler.max_num_seqs?"),  # Hydra: an unknown key
        (["cache.page_size=big"], "cache.page_size"),  # Hydra: a wrong type
        (["cache=nonexistent"], "Available options in 'cache'"),  # Hydra: an unknown option
        (["model.dtype=float64"], "allowed: auto, float32"),  # ours: a value out of its set
        (["cache.flashinfer_decode=fast"], "allowed: auto, tensor_cores, cuda_cores, xqa, fused"),
        (["cache.fused_rope=always"], "allowed: auto, off"),
        (["model.piecewise_graphs=on"], "model.piecewise_graphs='on' is not allowed; allowed: auto, off"),
        (["model.piecewise_max_tokens=0"], "model.piecewise_max_tokens=0 is out of range"),
        (["prompt=Hi"], "mode=generate"),  # ours: a key serve mode would ignore
    ],
)
def test_every_config_error_exits_alike(args, says):
    res = run_py(*args)
    assert res.returncode == CONFIG_ERROR_EXIT, res.stderr[-2000:]
    assert res.stderr.startswith("error: ") and says in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_busy_port_fails_before_the_model_loads(tiny_llama):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        t = time.perf_counter()
        res = run_py(f"model.path={tiny_llama}", f"server.port={port}")
    assert res.returncode == CONFIG_ERROR_EXIT and f"server.port={port}" in res.stderr, res.stderr[-2000:]
    assert "KV pool" not in res.stdout + res.stderr  # the model never loaded
    print(f"\nrefused in {time.perf_counter() - t:.1f} s")


def test_cpu_default_says_why_prefix_caching_is_off(tiny_llama):
    res = run_py(f"model.path={tiny_llama}", "mode=generate", "prompt=Hi", "sampling.max_tokens=2")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "prefix caching off (the sdpa backend (cache=auto picks it on the CPU)" in res.stderr, res.stderr


def test_a_script_that_ends_without_shutdown_exits_cleanly(tiny_llama, tmp_path):
    """The engine is mid-request when the script dies: its own traceback is the only one."""
    script = tmp_path / "dies.py"
    script.write_text(
        "import asyncio, sys, time\n"
        "from nanoslg import LLM, SamplingParams\n"
        f"llm = LLM('model.path={tiny_llama}', 'cache=sdpa', 'log_level=WARNING')\n"
        "params = SamplingParams(max_tokens=400, ignore_eos=True)\n"
        "asyncio.run_coroutine_threadsafe(llm.engine.generate([5, 6, 7], params), llm._loop)\n"
        "time.sleep(0.3)\n"
        "raise RuntimeError('the script dies here')\n"
    )
    for _ in range(2):  # it used to fail every time; twice shows it is not luck
        res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
        assert res.returncode == 1 and "the script dies here" in res.stderr
        assert res.stderr.count("Traceback") == 1 and "engine loop died" not in res.stderr, res.stderr[-3000:]


def test_a_sweep_preset_run_without_multirun_says_so(tiny_llama, tmp_path):
    """shared-prefix-on-off is a sweep (prefix caching on and off); without -m Hydra runs one job with
    the config's own values, so the run says that only one point ran and how to run them all."""
    small = ["bench.num_requests=2", "bench.shared_prefix_len=8", "bench.input_len_min=4", "bench.input_len_max=4"]
    small += ["bench.output_len_min=2", "bench.output_len_max=2", "bench.extra.progress=false"]
    args = ["+experiment=shared-prefix-on-off", f"model.path={tiny_llama}", "model.load_format=auto", "cache=paged"]
    args += [*small, f"bench.output_dir={tmp_path}", "bench.extra.aggregate=false"]
    res = run_py(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "sweep (cache.prefix_caching=true,false) but ran without -m" in res.stderr, res.stderr[-2000:]
    assert len(list(tmp_path.rglob("*.json"))) == 1  # the one run's record
    res = run_py("-m", *args[:-2], f"bench.output_dir={tmp_path / 'swept'}", "bench.extra.aggregate=false")
    assert res.returncode == 0 and "without -m" not in res.stderr, res.stderr[-2000:]
    assert len(list((tmp_path / "swept").rglob("*.json"))) == 2  # on and off
