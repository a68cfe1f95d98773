"""The bench layer: metrics math, roofline math, workloads, records and sweeps, and every workload end
to end on a tiny checkpoint (CPU). Nothing here asserts a speed."""

import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nanoslg.bench import hardware as hw
from nanoslg.bench import roofline as rl
from nanoslg.bench.aggregate import aggregate, swept_keys
from nanoslg.bench.metrics import RequestTiming, distribution, percentile, summarize
from nanoslg.bench.record import make_record, write_record
from nanoslg.bench.serving import hydra_value, server_overrides
from nanoslg.bench.session import drive
from nanoslg.bench.workloads import BenchRequest, TokenSpace, get_workload, make_requests, token_space
from nanoslg.core.compose import compose_config, compose_node
from nanoslg.core.config import BenchConfig
from nanoslg.core.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


# -- metrics -----------------------------------------------------------------------------------
def test_percentile_known_values():
    xs = list(range(1, 11))  # 1..10
    assert percentile(xs, 50) == pytest.approx(5.5)
    assert percentile(xs, 90) == pytest.approx(9.1)
    assert percentile(xs, 99) == pytest.approx(9.91)
    assert percentile(xs, 0) == 1 and percentile(xs, 100) == 10
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_percentile_matches_numpy():
    rng = random.Random(1)
    for n in (2, 3, 17, 100):
        xs = [rng.random() for _ in range(n)]
        for q in (1, 50, 90, 99):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_request_timing_math():
    t = RequestTiming(prompt_len=5, arrival=10.0)
    t.on_delta(1, 10.1)
    t.on_delta(0, 10.12)  # a delta with no token (held text) is not a token event
    t.on_delta(1, 10.15)
    t.on_delta(2, 10.25)
    t.finish(10.3)
    assert t.ok and t.num_output == 4
    assert t.ttft == pytest.approx(0.1)
    assert t.itls == pytest.approx([0.05, 0.1])
    assert t.e2e == pytest.approx(0.3)
    assert t.tpot == pytest.approx((10.3 - 10.1) / 3)
    t.output_len = 6  # an exact count from the transport wins over counted chunks
    assert t.num_output == 6


def test_summarize_known_inputs():
    a = RequestTiming(10, 0.0, [(0.1, 1), (0.2, 1), (0.4, 1)], end=0.4)
    b = RequestTiming(20, 0.0, [(0.3, 1), (0.5, 1)], end=0.5)
    failed = RequestTiming(30, 0.0)
    failed.finish(0.2, error="RequestError: too long")
    s = summarize([a, b, failed], wall_time=0.5)
    assert (s["completed"], s["failed"]) == (2, 1)
    assert s["errors"] == ["RequestError: too long"]
    assert s["input_tokens"] == 30 and s["output_tokens"] == 5
    assert s["output_tok_s"] == pytest.approx(10.0)
    assert s["total_tok_s"] == pytest.approx(70.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(200.0)  # ttfts 100 and 300 ms
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert s["itl_ms"]["p50"] == pytest.approx(200.0)  # itls 100, 200, 200
    assert s["itl_ms"]["n"] == 3
    assert s["tpot_ms"]["p50"] == pytest.approx((150.0 + 200.0) / 2)  # (0.4-0.1)/2, (0.5-0.3)/1
    assert s["e2e_ms"]["p99"] == pytest.approx(400 + 100 * 0.99)
    assert distribution([])["p50"] is None


# -- roofline ----------------------------------------------------------------------------------
QWEN3_06B = {
    "model_type": "qwen3",
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "vocab_size": 151936,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "intermediate_size": 3072,
    "tie_word_embeddings": True,
}
LLAMA3_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "vocab_size": 128256,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "tie_word_embeddings": False,
}


@pytest.mark.parametrize(
    "conf",
    [
        QWEN3_06B,
        LLAMA3_8B,
        {
            "model_type": "qwen2",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "vocab_size": 300,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 96,
            "tie_word_embeddings": True,
        },
        {
            "model_type": "llama",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "vocab_size": 300,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "intermediate_size": 96,
            "attention_bias": True,
            "mlp_bias": True,
        },
    ],
    ids=["qwen3-0.6b", "llama3-8b", "qwen2-tied-bias", "llama-biases"],
)
def test_param_count_equals_transformers(conf):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoConfig.for_model(**conf)
    with torch.device("meta"):  # shapes only: no memory, no time
        model = AutoModelForCausalLM.from_config(hf)
    assert rl.count_params(hf.to_dict()) == sum(p.numel() for p in model.parameters())


def test_facts_of_known_models():
    q = rl.facts_from_hf_config(QWEN3_06B, 2)
    assert q.num_params == 596_049_920
    assert q.kv_bytes_per_token == 2 * 28 * 8 * 128 * 2
    assert q.weight_bytes_per_step == q.num_params * 2  # tied: the table is the LM head, read every step
    ll = rl.facts_from_hf_config(LLAMA3_8B, 2)
    assert ll.num_params == 8_030_261_248
    assert ll.weight_bytes_per_step == (ll.num_params - 128256 * 4096) * 2  # the input table is only looked up
    assert ll.body_params == ll.num_params - 2 * 128256 * 4096


def _tiny_facts(**kw) -> rl.ModelFacts:
    base = dict(
        num_params=1000,
        dtype_bytes=2,
        num_layers=2,
        hidden_size=4,
        vocab_size=10,
        num_heads=2,
        num_kv_heads=1,
        head_dim=3,
        tied_embeddings=True,
        kv_bytes_per_token=24,
    )
    base.update(kw)
    return rl.ModelFacts(**base)


def test_simulate_one_request_by_hand():
    f = _tiny_facts()
    steps = rl.simulate([(4, 3)], f, max_num_seqs=8, max_num_batched_tokens=100)
    # prefill of 4 (samples token 1), then two decodes at contexts 4 and 5.
    assert [s.tokens for s in steps] == [4, 1, 1]
    assert [s.decodes for s in steps] == [0, 1, 1]
    w, kvb = f.weight_bytes_per_step, f.kv_bytes_per_token
    assert [s.bytes for s in steps] == [w + (4 + 4) * kvb, w + (5 + 1) * kvb, w + (6 + 1) * kvb]
    body, head, attn = 2 * f.body_params, 2 * 10 * 4, 4 * 2 * 2 * 3
    assert [s.flops for s in steps] == [body * 4 + head + attn * 10, body + head + attn * 5, body + head + attn * 6]
    fig = hw.Figures(bandwidth=100.0, peak_flops=1e4, bandwidth_source="t", flops_source="t", device_name="X")
    out = rl.roofline(steps, fig, f)
    expect = sum(max(s.bytes / 100.0, s.flops / 1e4) for s in steps)
    assert out["limit_s"] == pytest.approx(expect)
    assert out["memory_s"] == pytest.approx(sum(s.bytes for s in steps) / 100.0)
    assert out["steps"] == 3


def test_simulate_chunks_and_batch_cap():
    f = _tiny_facts()
    # budget 3: a 5-token prompt takes two steps; max_num_seqs=1 runs the requests one after another.
    steps = rl.simulate([(5, 2), (2, 1)], f, max_num_seqs=1, max_num_batched_tokens=3)
    assert [s.tokens for s in steps] == [3, 2, 1, 2]


def test_simulate_matches_closed_form_kv_reads():
    """All requests fit at once: KV reads are sum(o*p + o(o-1)/2), the issue's estimate."""
    f = _tiny_facts(kv_bytes_per_token=1, num_params=40, dtype_bytes=0)  # count KV tokens only
    reqs = [(random.Random(i).randint(5, 30), random.Random(100 + i).randint(1, 20)) for i in range(12)]
    steps = rl.simulate(reqs, f, max_num_seqs=64, max_num_batched_tokens=10_000)
    reads = sum(o * p + o * (o - 1) // 2 for p, o in reqs)
    writes = sum(p + o - 1 for p, o in reqs)
    assert sum(s.bytes for s in steps) == reads + writes
    assert len(steps) == max(o for _, o in reqs)


def test_offline_roofline_scale_matches_issue():
    """The issue's sanity estimate (from the shapes, not measured): Qwen3-0.6B offline at the table's H100
    copy bandwidth needs about 5.4-6 s of KV+weight reads."""
    b = BenchConfig()
    reqs = make_requests(b, TokenSpace(1000))
    shape = [(len(r.prompt), r.max_tokens) for r in reqs]
    facts = rl.facts_from_hf_config(QWEN3_06B, 2)
    steps = rl.simulate(shape, facts, max_num_seqs=256, max_num_batched_tokens=8192)
    fig = hw.resolve_figures("cuda", "NVIDIA H100 80GB HBM3")
    out = rl.roofline(steps, fig, facts)
    assert 4.8 < out["memory_s"] < 6.5
    assert out["compute_s"] < out["memory_s"] <= out["limit_s"] <= out["memory_s"] + out["compute_s"]


def test_shared_prefix_caching_saves_compute_not_reads():
    f = rl.facts_from_hf_config(QWEN3_06B, 2)
    reqs = [(64 + 8, 4)] * 6
    on = rl.simulate(reqs, f, max_num_seqs=8, max_num_batched_tokens=4096, shared_prefix_len=64, prefix_caching=True)
    off = rl.simulate(reqs, f, max_num_seqs=8, max_num_batched_tokens=4096, shared_prefix_len=64, prefix_caching=False)
    assert sum(s.tokens for s in on) == sum(s.tokens for s in off) - 5 * 64
    assert sum(s.flops for s in on) < sum(s.flops for s in off)


def test_cascade_reads_the_shared_prefix_once_per_decode_step():
    f = rl.facts_from_hf_config(QWEN3_06B, 2)
    reqs = [(300 + 8, 5)] * 10  # a 300-token shared prefix, 10 sequences, 4 decode steps
    kw = dict(max_num_seqs=16, max_num_batched_tokens=8192, shared_prefix_len=300, prefix_caching=True)
    plain, cascade = rl.simulate(reqs, f, **kw), rl.simulate(reqs, f, **kw, cascade=True)
    saved = [(a.bytes - b.bytes) / f.kv_bytes_per_token for a, b in zip(plain, cascade)]
    assert saved == [0.0] * (len(saved) - 4) + [9 * 300.0] * 4  # prefill steps read as before
    few = rl.simulate(reqs[:7], f, **kw, cascade=True)  # under MIN_BATCH sequences: no cascade
    assert [s.bytes for s in few] == [s.bytes for s in rl.simulate(reqs[:7], f, **kw)]


def test_mbu_known_numbers():
    f = _tiny_facts(num_params=500, dtype_bytes=2, kv_bytes_per_token=10)  # 1000 weight bytes per step
    fig = hw.Figures(1000.0, 1.0, "t", "t", "X")
    # p=2, o=3: decode steps read 1000 + (2+1+1)*10 and 1000 + (2+2+1)*10 bytes.
    assert rl.decode_bytes(f, 2, 3) == 2000 + 90
    assert rl.mbu(f, fig, 2, 3, decode_time_s=2.09) == pytest.approx(1.0)
    assert rl.mbu(f, fig, 2, 1, decode_time_s=1.0) is None


@pytest.mark.parametrize(
    "name, expect",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100-80G"),
        ("NVIDIA A100 80GB PCIe", "A100-80G"),
        ("Tesla T4", None),
    ],
)
def test_gpu_table(name, expect):
    spec = hw.lookup_gpu(name)
    assert (spec.name if spec else None) == expect


def test_figures_choice():
    h100 = "NVIDIA H100 80GB HBM3"
    assert hw.resolve_figures("cuda", h100).bandwidth == 3.0e12  # the measured-copy figure by default
    assert hw.resolve_figures("cuda", h100, bandwidth="spec").bandwidth == 3.35e12
    two = hw.resolve_figures("cuda", "NVIDIA H200", num_devices=2)
    assert (two.bandwidth, two.peak_flops) == (2 * 4.8e12, 2 * 989e12)
    given = hw.resolve_figures("cuda", h100, bandwidth_tbs=1.5, peak_tflops=100)
    assert (given.bandwidth, given.peak_flops) == (1.5e12, 100e12)
    assert "989.0 TFLOP/s" in hw.resolve_figures("cuda", h100).describe()
    cpu = hw.resolve_figures("cpu", "CPU", "float32")  # measured: a memcpy and a matmul
    assert cpu.bandwidth > 0 and cpu.peak_flops > 0 and "measured" in cpu.bandwidth_source
    with pytest.raises(ConfigError, match="bench.extra.bandwidth"):
        hw.resolve_figures("cuda", h100, bandwidth="guess")


# -- workloads ---------------------------------------------------------------------------------
def test_requests_are_seeded_and_in_bounds():
    b = BenchConfig(num_requests=50, input_len_min=3, input_len_max=9, output_len_min=2, output_len_max=5)
    space = TokenSpace(40, frozenset({0, 1, 2, 7}))
    a, again = make_requests(b, space), make_requests(b, space)
    assert [r.prompt for r in a] == [r.prompt for r in again]
    assert all(3 <= len(r.prompt) <= 9 and 2 <= r.max_tokens <= 5 for r in a)
    toks = [t for r in a for t in r.prompt]
    assert all(type(t) is int and 0 <= t < 40 and t not in {0, 1, 2, 7} for t in toks)
    assert {len(r.prompt) for r in a} == set(range(3, 10))  # uniform over the whole range
    other = make_requests(BenchConfig(**{**b.__dict__, "seed": 1}), space)
    assert [r.prompt for r in other] != [r.prompt for r in a]


def test_shared_prefix_and_poisson_arrivals():
    b = BenchConfig(
        num_requests=400,
        shared_prefix_len=5,
        input_len_min=2,
        input_len_max=2,
        output_len_min=1,
        output_len_max=1,
        request_rate=4.0,
    )
    reqs = make_requests(b, TokenSpace(1000))
    assert len({tuple(r.prompt[:5]) for r in reqs}) == 1
    assert all(len(r.prompt) == 7 for r in reqs)
    arrivals = [r.arrival for r in reqs]
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals)
    mean_gap = arrivals[-1] / (len(arrivals) - 1)
    assert 0.2 < mean_gap < 0.3  # 1 / rate = 0.25 s


def test_token_space_specials():
    llama3 = token_space(128256, None, [128001, 128008, 128009])
    assert llama3.high == 128001  # the specials sit at the top: left out
    small = token_space(256, None, [2])
    assert small.high == 256 and 2 in small.exclude

    class Tok:
        all_special_ids = [0, 1, 2]
        added_tokens_decoder = {300: None}

        def __len__(self):
            return 301

    t = token_space(512, Tok(), [2])
    assert t.high == 301 and t.exclude == frozenset({0, 1, 2, 300})


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"input_len_min": 10, "input_len_max": 5}, "bench.input_len_min"),
        ({"output_len_min": 0, "output_len_max": 5}, "bench.output_len_min"),
        ({"request_rate": 0.0}, "bench.request_rate"),
        ({"concurrency": 0}, "bench.concurrency"),
    ],
)
def test_bad_numbers_name_the_key(changes, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        make_requests(BenchConfig(**changes), TokenSpace(100))


def test_workload_registry():
    assert get_workload("serving").transport == "http"
    assert get_workload("offline").transport == "engine"
    with pytest.raises(ConfigError, match="bench.workload"):
        get_workload("nope")
    with pytest.raises(ConfigError, match="batch1"):
        get_workload("batch1").requests(BenchConfig(num_requests=2), TokenSpace(100))
    with pytest.raises(ConfigError, match="shared_prefix_len"):
        get_workload("shared_prefix").requests(BenchConfig(shared_prefix_len=0), TokenSpace(100))


@pytest.mark.parametrize(
    "name, workload",
    [("offline", "offline"), ("batch1", "batch1"), ("shared_prefix", "shared_prefix"), ("serving", "serving")],
)
def test_bench_yaml_numbers(name, workload):
    node = compose_node(["mode=bench", f"bench={name}"])
    assert node.bench.workload == workload
    b = node.bench
    if name == "offline":
        assert (b.num_requests, b.input_len_min, b.input_len_max, b.output_len_min, b.output_len_max) == (
            256,
            100,
            1024,
            100,
            1024,
        )
    if name == "batch1":
        assert (b.num_requests, b.input_len_max, b.output_len_max) == (1, 128, 256)
    if name == "shared_prefix":
        assert (b.num_requests, b.shared_prefix_len, b.input_len_max, b.output_len_max) == (256, 1024, 64, 128)
    if name == "serving":
        assert (b.input_len_max, b.output_len_max) == (1024, 128) and b.request_rate


def test_presets_compose():
    for p in sorted((REPO / "conf" / "experiment").glob("*.yaml")):
        text = p.read_text()
        assert text.startswith("# @package _global_"), p.name
        node = compose_node([f"+experiment={p.stem}"])
        assert node.mode == "bench" and node.bench.name, p.name


def test_drive_caps_concurrency_and_keeps_order():
    inflight, peak, order = 0, 0, []

    async def send(i, r, t):
        nonlocal inflight, peak
        inflight += 1
        peak = max(peak, inflight)
        order.append(i)
        t.arrival = 0.0
        await asyncio.sleep(0.001)
        t.on_delta(1, 0.5)
        t.finish(1.0)
        inflight -= 1

    reqs = [BenchRequest([1, 2], 1) for _ in range(20)]
    timings, wall = asyncio.run(drive(reqs, send, concurrency=3, progress=False))
    assert peak == 3 and order == list(range(20)) and all(t.ok for t in timings) and wall > 0


# -- records and sweeps ------------------------------------------------------------------------
def test_record_has_the_promised_keys(tmp_path):
    node = compose_node(["mode=bench", "bench=batch1", f"bench.output_dir={tmp_path}"])
    rec = make_record(node, {"output_tok_s": 1.0}, overrides=["bench=batch1"])
    for key in ("config", "git", "gpu", "versions", "results", "time", "workload", "overrides"):
        assert key in rec
    assert rec["config"]["bench"]["workload"] == "batch1" and rec["config"]["model"]["name"] == "demo"
    assert set(rec["gpu"]) == {"name", "count"}
    assert {"torch", "flashinfer", "transformers", "llguidance", "python"} <= set(rec["versions"])
    assert rec["versions"]["torch"] == torch.__version__
    assert set(rec["git"]) == {"commit", "dirty"}
    path = write_record(rec, tmp_path / "batch1")
    assert path.parent == tmp_path / "batch1" / "records"
    assert json.loads(path.read_text())["results"] == {"output_tok_s": 1.0}
    again = write_record(rec, tmp_path / "batch1")  # same config in the same second: a new file
    assert again != path and again.exists()


def _fake_record(folder: Path, seqs: int, tok_s: float, ttft: float) -> None:
    node = compose_node(["mode=bench", f"scheduler.max_num_seqs={seqs}"])
    res = {
        "output_tok_s": tok_s,
        "total_tok_s": 2 * tok_s,
        "ttft_ms": {"p50": ttft, "p99": 2 * ttft},
        "itl_ms": {"p50": 1.0},
        "tpot_ms": {"p50": 1.0},
        "e2e_ms": {"p50": 900.0},
        "wall_time_s": 3.0,
        "roofline": {"percent_of_limit": 42.0},
        "peak_gpu_memory": None,
    }
    write_record(make_record(node, res, overrides=["mode=bench", f"scheduler.max_num_seqs={seqs}"]), folder)


def test_aggregate_writes_table_and_png(tmp_path):
    folder = tmp_path / "sweep"
    for seqs, tok in ((64, 100.0), (8, 20.0), (256, 300.0)):
        _fake_record(folder, seqs, tok, ttft=tok / 10)
    recs = [json.loads(p.read_text()) for p in (folder / "records").glob("*.json")]
    assert swept_keys(recs) == ["scheduler.max_num_seqs"]
    out = aggregate(folder)
    md = Path(out["table"]).read_text()
    assert "| scheduler.max_num_seqs |" in md and "Swept: scheduler.max_num_seqs" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| 8 ") or ln.startswith("| 64 ") or ln.startswith("| 256 ")]
    assert len(rows) == 3 and any("| 300 |" in r for r in rows) and any("42.0%" in r for r in rows)
    png = Path(out["plot"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_adhoc_runs_go_to_an_ignored_folder_presets_to_experiments():
    from nanoslg.bench.record import experiment_dir

    adhoc = experiment_dir(compose_node(["mode=bench", "bench=batch1"]).bench)
    assert adhoc == Path("outputs/bench/batch1")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(adhoc / "records" / "x.json")], cwd=REPO)
    assert ignored.returncode == 0, "ad-hoc bench output must be ignored by git"
    preset = experiment_dir(compose_node(["+experiment=shared-prefix-on-off"]).bench)
    assert preset == REPO / "experiments" / "shared-prefix-on-off"
    given = experiment_dir(compose_node(["mode=bench", "bench.output_dir=/tmp/x"]).bench)
    assert given == Path("/tmp/x/offline")


def _record(folder: Path, overrides: list[str], tok_s: float, commit: str) -> None:
    rec = make_record(compose_node(["mode=bench", *overrides]), {"output_tok_s": tok_s, "ttft_ms": {"p50": 9.0}})
    rec["git"]["commit"] = commit
    write_record(rec, folder)


def test_aggregate_never_mixes_commits_workloads_or_models(tmp_path):
    from nanoslg.bench.aggregate import sweeps

    folder = tmp_path / "mixed"
    for on, tok in ((True, 400.0), (False, 100.0)):  # one on/off sweep; progress bars differ too
        _record(folder, [f"cache.prefix_caching={on}", f"bench.extra.progress={on}"], tok, "a" * 40)
    _record(folder, ["cache.prefix_caching=true"], 500.0, "b" * 40)  # another commit
    _record(folder, ["model=qwen3-0.6b", "cache.prefix_caching=true"], 50.0, "b" * 40)  # another model
    _record(folder, ["bench=batch1"], 7.0, "b" * 40)  # another workload
    groups = sweeps([json.loads(p.read_text()) for p in (folder / "records").glob("*.json")])
    assert sorted((c[0], w, m) for (c, w, m), _ in groups) == [
        ("a", "offline", "demo"),
        ("b", "batch1", "demo"),
        ("b", "offline", "demo"),
        ("b", "offline", "qwen3-0.6b"),
    ]
    md = Path(aggregate(folder)["table"]).read_text()
    assert md.count("\n## ") == 4 and "## qwen3-0.6b, offline, commit bbbbbbbb: 1 run(s)" in md
    assert "Swept: cache.prefix_caching\n" in md  # not the progress bars
    assert md.count("Swept: nothing") == 3 and "None" not in md.split("\n", 1)[0]


def test_plot_kinds_follow_the_sweep(tmp_path):
    from nanoslg.bench.aggregate import load_records, plot_kind, ratio_label

    onoff, rates = tmp_path / "onoff", tmp_path / "rates"
    for on, tok in ((True, 400.0), (False, 100.0)):
        _record(onoff, [f"cache.prefix_caching={on}"], tok, "c" * 40)
    for seqs in (8, 64, 256):
        _record(rates, [f"scheduler.max_num_seqs={seqs}"], float(seqs), "c" * 40)
    recs = load_records(onoff)
    assert plot_kind(recs, ["cache.prefix_caching"]) == "ratio" and ratio_label(400.0, 100.0) == "4.00x off"
    assert plot_kind(load_records(rates), ["scheduler.max_num_seqs"]) == "line"
    assert plot_kind(recs, []) == "bars"
    for folder in (onoff, rates):
        assert Path(aggregate(folder)["plot"]).read_bytes()[:4] == b"\x89PNG"


def test_swept_keys_without_overrides_compare_configs():
    a = make_record(compose_node(["cache=sdpa"]), {}, overrides=None)
    b = make_record(compose_node(["cache=sdpa", "scheduler.policy=fcfs", "cache.page_size=32"]), {}, overrides=None)
    a["overrides"] = b["overrides"] = None
    assert swept_keys([a, b]) == ["cache.page_size"]


def test_server_overrides_reproduce_the_config():
    from nanoslg.bench.record import config_dict

    node = compose_node(
        [
            "cache=sdpa",
            "model.path=" + hydra_value("/tmp/it's a [path]"),
            "scheduler.max_num_seqs=7",
            "parallel.stage_layers=[1,2]",
            "server.api_key=" + hydra_value("k=v"),
        ]
    )
    conf = config_dict(node)
    again = config_dict(compose_node(server_overrides(conf, "127.0.0.1", 1234)[1:]))
    assert again["model"]["path"] == "/tmp/it's a [path]"
    for group in ("model", "cache", "scheduler", "parallel"):
        assert again[group] == conf[group]
    assert again["server"]["port"] == 1234 and again["server"]["api_key"] == "k=v"
    assert hydra_value(None) == "null" and hydra_value(True) == "true" and hydra_value(0.5) == "0.5"


# -- end to end on a tiny checkpoint (CPU) ----------------------------------------------------
TINY = [
    "bench.num_requests=4",
    "bench.input_len_min=8",
    "bench.input_len_max=16",
    "bench.output_len_min=4",
    "bench.output_len_max=8",
    "bench.warmup=1",
    "bench.extra.progress=false",
]


def _bench(path, tmp_path, *overrides):
    from nanoslg.bench.runner import run_bench

    cfg, node = compose_config(
        [f"model.path={path}", "cache=sdpa", "mode=bench", f"bench.output_dir={tmp_path}", *overrides]
    )
    return run_bench(cfg, node)


def _check_record(res: dict, workload: str):
    rec = json.loads(Path(res["record"]).read_text())
    assert rec["workload"] == workload and rec["results"]["output_tokens"] == res["output_tokens"]
    assert rec["config"]["bench"]["workload"] == workload
    assert Path(res["aggregate"]["table"]).exists() and Path(res["aggregate"]["plot"]).exists()
    return rec


def test_offline_end_to_end(tiny_llama, tmp_path, capsys):
    res = _bench(tiny_llama, tmp_path, "bench=offline", *TINY)
    assert res["completed"] == 4 and res["failed"] == 0
    b = BenchConfig(num_requests=4, input_len_min=8, input_len_max=16, output_len_min=4, output_len_max=8)
    assert res["output_tokens"] == sum(r.max_tokens for r in make_requests(b, TokenSpace(10)))  # EOS ignored
    assert res["ttft_ms"]["n"] == 4 and res["itl_ms"]["n"] == res["output_tokens"] - 4
    assert res["kv_pool"]["tokens"] > 0 and res["kv_pool"]["bytes"] > 0
    roof = res["roofline"]
    assert roof["limit_s"] > 0 and roof["percent_of_limit"] > 0 and "measured now" in roof["figures"]
    assert res["peak_gpu_memory"] is None  # CPU
    _check_record(res, "offline")
    out = capsys.readouterr().out
    assert "output tok/s" in out and "% of the limit" in out and "TTFT" in out


def test_batch1_reports_mbu(tiny_llama, tmp_path):
    res = _bench(
        tiny_llama,
        tmp_path,
        "bench=batch1",
        "bench.input_len_min=8",
        "bench.input_len_max=8",
        "bench.output_len_min=6",
        "bench.output_len_max=6",
        "bench.extra.progress=false",
    )
    assert res["completed"] == 1 and res["output_tokens"] == 6
    assert res["roofline"]["mbu_percent"] > 0 and res["roofline"]["decode_tok_s"] > 0
    _check_record(res, "batch1")


def test_shared_prefix_end_to_end(tiny_llama, tmp_path):
    res = _bench(
        tiny_llama,
        tmp_path,
        "bench=shared_prefix",
        *TINY,
        "bench.shared_prefix_len=12",
        "bench.input_len_min=4",
        "bench.input_len_max=4",
    )
    assert res["completed"] == 4 and res["input_tokens"] == 4 * 16
    _check_record(res, "shared_prefix")


def test_concurrency_and_rate_through_the_engine(tiny_llama, tmp_path, monkeypatch):
    """bench.request_rate: no request is sent before its Poisson arrival offset; bench.concurrency: never
    more than that many requests in flight (from each request's recorded send and end times)."""
    from nanoslg.bench import session

    runs = []  # (requests, timings, perf_counter just before drive started) of every drive: warm-up, timed

    async def recording_drive(reqs, send, *args, **kwargs):
        t0 = time.perf_counter()
        timings, wall = await real_drive(reqs, send, *args, **kwargs)
        runs.append((reqs, timings, t0))
        return timings, wall

    real_drive = session.drive
    monkeypatch.setattr(session, "drive", recording_drive)
    # Outputs long enough that a request outlasts the gaps between arrivals: uncapped, they would overlap.
    res = _bench(
        tiny_llama,
        tmp_path,
        "bench=offline",
        *TINY,
        "bench.concurrency=2",
        "bench.request_rate=20",
        "bench.output_len_min=48",
        "bench.output_len_max=64",
    )
    assert res["completed"] == 4
    reqs, timings, t0 = runs[-1]  # the timed run
    assert len(timings) == 4 and all(t.ok for t in timings)
    arrivals = [r.arrival for r in reqs]
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals) and arrivals[-1] > 0
    # uvloop's timers count whole milliseconds: a sleep may end slightly before its time
    assert all(t.arrival - t0 >= r.arrival - 5e-3 for r, t in zip(reqs, timings))
    # a request's send time is taken once it holds one of the slots, its end before it gives the slot back
    in_flight = [sum(1 for u in timings if u.arrival <= t.arrival < u.end) for t in timings]
    assert max(in_flight) <= 2


def test_too_long_requests_fail_at_start(tiny_llama, tmp_path):
    with pytest.raises(ConfigError, match="bench.input_len_max"):
        _bench(tiny_llama, tmp_path, "bench=offline", *TINY, "bench.input_len_max=100000", "bench.input_len_min=99999")


def test_peer_hf_ratio(tiny_llama, tmp_path, capsys):
    res = _bench(tiny_llama, tmp_path, "bench=offline", *TINY, "bench.peer=hf")
    peer = res["peer"]
    assert peer["completed"] == 4 and peer["output_tokens"] == res["output_tokens"]
    assert peer["speedup_output_tok_s"] == pytest.approx(res["output_tok_s"] / peer["output_tok_s"])
    assert "x transformers" in capsys.readouterr().out


def test_peer_hf_plain_generate(tiny_llama, tmp_path):
    res = _bench(
        tiny_llama,
        tmp_path,
        "bench=offline",
        *TINY,
        "bench.peer=hf",
        "bench.extra.hf_method=generate",
        "bench.extra.hf_batch_size=3",
    )
    assert res["peer"]["output_tokens"] == res["output_tokens"] and "generate" in res["peer"]["method"]


def test_serving_against_a_loopback_server(tiny_llama, tmp_path):
    res = _bench(
        tiny_llama,
        tmp_path,
        "bench=serving",
        *TINY,
        "bench.request_rate=20",
        "bench.concurrency=3",
        "bench.extra.server_start_timeout=300",
    )
    assert res["completed"] == 4 and res["failed"] == 0
    b = BenchConfig(num_requests=4, input_len_min=8, input_len_max=16, output_len_min=4, output_len_max=8)
    assert res["output_tokens"] == sum(r.max_tokens for r in make_requests(b, TokenSpace(10)))
    assert res["ttft_ms"]["p50"] > 0 and res["server"]["started_here"]
    # One SSE chunk per engine step, text or not (as vLLM streams): else TTFT/ITL measure the wrong thing.
    assert res["stream_chunks"] == res["output_tokens"]
    assert res["itl_ms"]["n"] == res["output_tokens"] - 4
    assert res["server"]["url"].startswith("http://127.0.0.1:")
    cold = res["cold_start"]  # spawn -> /health -> the warm-up request's first token
    assert 0 < cold["server_ready_s"] < cold["first_token_s"]
    slog = cold["server_log"]  # the server's own account of its start-up, from its log
    # The server's log gives its times to a tenth of a second.
    assert 0 < slog["engine_built_s"] <= slog["serving_after_run_py_s"] < cold["server_ready_s"] + 0.05
    assert 0 < slog["config_read_after_run_py_s"] <= slog["serving_after_run_py_s"]
    assert {"model", "kv_budget", "kv_pool_and_graphs"} <= set(slog["engine_phases_s"])
    _check_record(res, "serving")


def test_multirun_sweep_aggregates(tiny_llama, tmp_path):
    """`python run.py -m mode=bench ...` writes a record per job and one table/plot for the sweep."""
    cmd = [
        sys.executable,
        str(REPO / "run.py"),
        "-m",
        "mode=bench",
        f"model.path={tiny_llama}",
        "cache=sdpa",
        "bench=offline",
        *TINY,
        "bench.num_requests=2",
        "bench.name=sweep",
        f"bench.output_dir={tmp_path}",
        "scheduler.max_num_seqs=1,2",
        f"hydra.sweep.dir={tmp_path}/multirun",
    ]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    folder = tmp_path / "sweep"
    assert len(list((folder / "records").glob("*.json"))) == 2
    md = (folder / "results.md").read_text()
    assert "scheduler.max_num_seqs" in md and (folder / "results.png").exists()
    assert sum(1 for ln in md.splitlines() if ln.startswith("| 1 ") or ln.startswith("| 2 ")) == 2
