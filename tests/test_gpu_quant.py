"""GPU checks of low precision (skipped without CUDA): the FP8 and AWQ kernels against their torch
reference paths, on random matrices and on a decisive model; FP8 KV against bf16 KV; CUDA graphs and
overlap change no token with FP8 (and AWQ) on.

The model is test_gpu.py's random bf16 Llama with GQA 4 (FlashInfer's tensor-core decode, as
Llama-3.1-8B), quantized by the tests' own quantizer (tests/quant_ckpt.py). Its reference is
transformers in float32 on the dequantized weights, FP8 activations rounded by a pre-hook as the
engine rounds them; each greedy token is scored teacher-forced (`gaps`) as test_gpu.py does.
"""

import pytest
import torch
from quant_ckpt import awq_pack, awq_quantize, fake_quant_act, make_awq, make_fp8
from test_gpu import GAP_TOL, _bf16_llama

from nanoslg import LLM, SamplingParams
from nanoslg.model.quant import base as quant_base

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
# Nats. FP8 rounding turns the bf16 engine's last-bit differences from the float32 reference into whole
# float8 steps (tests/test_quant.py says how), so near ties may go either way by more than bf16 noise
# does; a wrong scale or kernel is off by several nats. Not yet measured on a GPU: the tests print the
# gaps they see, and this can tighten once they have run.
FP8_GAP_TOL = 1.0
# Seen on an H100 (experiments/low-precision/gpu_quant_tests.log): on this bf16 test model FP8
# rounding moves greedy picks by whole nats for the kernels and the torch reference alike, so these
# model-level checks cannot yet tell a kernel bug from rounding; issue #16 stays open until a model
# with wider logit margins (or a per-layer comparison) decides them.
FP8_MODEL_XFAIL = pytest.mark.xfail(reason="FP8 rounding exceeds the tolerance on this bf16 model (#16)", strict=False)
FP8_SM = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="FP8 needs SM89+"
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return _bf16_llama(tmp_path_factory.mktemp("quant-base"), kv_heads=1)


@pytest.fixture(scope="module")
def ckpts(base, tmp_path_factory):
    """method -> (engine overrides, dequantized float32 reference checkpoint)."""
    root = str(tmp_path_factory.mktemp("quant"))
    awq, awq_ref = make_awq(base, root, "awq", 128)
    fp8, fp8_ref = make_fp8(base, root, "fp8", "channel")
    _, online_ref = make_fp8(base, root, "fp8-online", "float")
    return {
        "awq": ([f"model.path={awq}"], awq_ref),
        "fp8": ([f"model.path={fp8}"], fp8_ref),
        "fp8-online": ([f"model.path={base}", "model.quantization=fp8"], online_ref),
    }


def prompts(seed: int, lengths=(9, 64, 300)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1024, (n,), generator=g).tolist() for n in lengths]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def reference(path: str, fp8_acts: bool, fp8_kv: bool = False, dtype: torch.dtype = torch.float32):
    """transformers on the GPU (float32 unless dtype says), on a dequantized checkpoint; optionally FP8
    activations / KV."""
    from test_kv_fp8 import hf_fp8_kv
    from transformers import AutoModelForCausalLM

    m = hf_fp8_kv(path) if fp8_kv else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    m = m.to(dtype).cuda().eval()
    if fp8_acts:
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
                mod.register_forward_pre_hook(lambda _, args: (fake_quant_act(args[0]),))
    return m


def gaps(m, prompt: list[int], tokens: list[int]) -> list[float]:
    ids = torch.tensor([prompt + tokens[:-1]], device="cuda")
    with torch.no_grad():
        lp = torch.log_softmax(m(ids).logits[0, len(prompt) - 1 :].float(), -1)
    rows, cols = torch.arange(len(tokens), device="cuda"), torch.tensor(tokens, device="cuda")
    return (lp.max(-1).values - lp[rows, cols]).tolist()


def max_gap(m, ps, runs) -> float:
    return max(max(gaps(m, p, t)) for p, t in zip(ps, runs))


# -- kernels on random matrices -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_awq_kernels_match_the_reference(dtype):
    """The GEMV (1 row, K splits), the GEMM (2..255 rows) and dequantize + cuBLAS (256+ rows)."""
    from nanoslg.model.quant.awq import dequantize, pack_k, unpack_awq
    from nanoslg.model.quant.kernels.awq import awq_linear, split_counts

    torch.manual_seed(0)
    for n, k, g in ((3072, 2048, 128), (1000, 1024, 64)):
        values, zeros, scales = awq_quantize(torch.randn(n, k) * 0.02, g)
        qw, z = pack_k(unpack_awq(awq_pack(values))).cuda(), unpack_awq(awq_pack(zeros)).cuda()
        s = scales.cuda()
        w = dequantize(qw, z, s, g)  # float32 [k, n]
        for m in (1, 2, 7, 16, 33, 100, 255, 256, 600):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            ref = x.float() @ w
            out = awq_linear(x, qw, z, s, g)
            assert out.dtype == dtype and out.shape == (m, n)
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-2, (n, k, g, m, err)
            assert torch.equal(awq_linear(x, qw, z, s, g), out)  # deterministic: no atomic adds
            # the GEMV's last split adds the parts as the kernel of their own does
            assert torch.equal(awq_linear(x, qw, z, s, g, counts=split_counts(n, "cuda")), out)


@FP8_SM
def test_fp8_kernels_match_the_reference():
    from nanoslg.model.quant.fp8 import fp8_kernel, fp8_linear_torch, quantize_act, quantize_weight
    from nanoslg.model.quant.kernels.fp8 import fp8_linear, quantize_rows

    torch.manual_seed(0)
    for n, k in ((3072, 2048), (1024, 4096)):
        wq, ws = quantize_weight(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
        kernel = fp8_kernel(wq)
        assert kernel in ("rowwise", "tensorwise")
        for m in (1, 3, 16, 17, 64, 300):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 2
            q, s = quantize_rows(x)
            q_ref, s_ref = quantize_act(x)
            torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
            assert (q.float() == q_ref.float()).float().mean() > 0.999  # a division's last bit, at most
            for act in (None, torch.tensor([0.05], device="cuda")):
                ref = fp8_linear_torch(x, wq, ws, act).float()
                out = fp8_linear(x, wq, ws, act, kernel).float()
                err = ((out - ref).abs().max() / ref.abs().max()).item()
                assert err < 1e-2, (n, k, m, act, err)


LLAMA_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)
ROWS = (1, 3, 8, 16, 17, 64, 65)  # the GEMVs, the skinny tiles, both sides of the FP8 cutover, the AWQ GEMM


def _graph_replay(fn):
    """fn's result from a captured CUDA graph (compiled by an eager call first, as the engine warms up)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    return out.clone()


@FP8_SM
@pytest.mark.parametrize("shape", list(LLAMA_8B))
def test_fp8_skinny_on_llama_shapes(shape):
    """Llama-3.1-8B's linears through fp8_linear (skinny kernel up to SKINNY_ROWS rows, _scaled_mm after)
    against the reference; the same bits again, and from a CUDA graph replay (K splits in a fixed order)."""
    from nanoslg.model.quant.fp8 import fp8_kernel, fp8_linear_torch, quantize_weight
    from nanoslg.model.quant.kernels.fp8 import fp8_linear, split_counts

    n, k = LLAMA_8B[shape]
    torch.manual_seed(0)
    wq, ws = quantize_weight(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
    kernel = fp8_kernel(wq)
    counts = split_counts(n, "cuda")
    for m in ROWS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16) * 2
        for act in (None, torch.tensor([0.05], device="cuda")):
            ref = fp8_linear_torch(x, wq, ws, act).float()
            out = fp8_linear(x, wq, ws, act, kernel)
            assert out.dtype == torch.bfloat16 and out.shape == (m, n)
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-2, (shape, m, act, err)
            assert torch.equal(fp8_linear(x, wq, ws, act, kernel), out)
            assert torch.equal(_graph_replay(lambda x=x, act=act: fp8_linear(x, wq, ws, act, kernel)), out)
            # as the layers call it: the last K split adds the parts, eagerly and from a graph
            fused = [fp8_linear(x, wq, ws, act, kernel, counts=counts) for _ in range(2)]
            fused.append(_graph_replay(lambda x=x, act=act: fp8_linear(x, wq, ws, act, kernel, counts=counts)))
            assert all(torch.equal(f, out) for f in fused) and not counts.any(), (shape, m, act)
    if shape == "down":  # one row: silu(gate) * up computed as the skinny kernel loads it
        from nanoslg.model.kernels import silu_and_mul

        h = torch.randn(1, 2 * k, device="cuda", dtype=torch.bfloat16) * 2
        want = fp8_linear(silu_and_mul(h), wq, ws, None, kernel, counts=counts)
        got = fp8_linear(h, wq, ws, None, kernel, counts=counts, silu_mul=True)
        same = (got == want).float().mean().item()
        print(f"\nFP8 down, silu(gate) * up in its loads: {same:.4f} same bits as the activation kernel's")
        # the bits of the unfused path, which steps of more rows take: a row's tokens cannot depend on it
        assert torch.equal(got, want) and not counts.any()
        fn = lambda: fp8_linear(h, wq, ws, None, kernel, counts=counts, silu_mul=True)  # noqa: E731
        assert torch.equal(_graph_replay(fn), got)


@FP8_SM
def test_fp8_programmatic_launch_waits_for_its_input(monkeypatch):
    """On SM90 the skinny kernel launches while the kernel before it finishes (programmatic dependent
    launch) and lets the next one launch early: a chain of them, each reading the last one's output
    (its K splits added by the last split, after the next kernel may have launched), gives the bits of
    the same kernels launched one at a time, eagerly and from a graph."""
    from nanoslg.model.quant.fp8 import fp8_kernel, quantize_weight
    from nanoslg.model.quant.kernels import fp8 as fp8_k

    torch.manual_seed(0)
    shapes = [(4096, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (4096, 4096)]  # o, o, gate_up, down, o
    layers = []
    for n, k in shapes:
        wq, ws = quantize_weight(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
        layers.append((wq, ws, fp8_k.split_counts(n, "cuda"), k == 14336))

    def chain(x, sync=False):  # each kernel reads the one before's output directly: down takes [gate | up]
        for wq, ws, counts, silu_mul in layers:
            x = fp8_k.fp8_linear(x, wq, ws, None, fp8_kernel(wq), counts=counts, silu_mul=silu_mul)
            if sync:
                torch.cuda.synchronize()
        return x

    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    assert fp8_k.pdl_ok(x.device) == (torch.cuda.get_device_capability() >= (9, 0))  # on SM90 the path under test
    got, replayed = chain(x), _graph_replay(lambda: chain(x))
    monkeypatch.setattr(fp8_k, "pdl_ok", lambda device: False)
    want = chain(x, sync=True)  # one at a time, nothing launched early
    assert torch.isfinite(want).all() and want.abs().max() > 0.1
    assert torch.equal(got, want) and torch.equal(replayed, want)
    assert not any(c.any() for _, _, c, _ in layers)


@FP8_SM
def test_fp8_mlp_one_row_on_llama_shapes(monkeypatch):
    """Batch-1 decode's FP8 MLP in two kernels (gate_up's epilogue computes silu(gate) * up and hands
    down the row's absolute max) against gate_up, FlashInfer's activation kernel and down one at a
    time: the same bits, eagerly, from a graph, and between two o projections launched early (PDL)."""
    from nanoslg.model.kernels import silu_and_mul
    from nanoslg.model.quant.fp8 import fp8_kernel, quantize_weight
    from nanoslg.model.quant.kernels import fp8 as fp8_k

    torch.manual_seed(0)
    (w1, s1), (w2, s2), (wo, so) = (
        quantize_weight(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
        for n, k in (LLAMA_8B["gate_up"], LLAMA_8B["down"], LLAMA_8B["o"])
    )
    kernel, counts, counts_o = fp8_kernel(w1), fp8_k.split_counts(4096, "cuda"), fp8_k.split_counts(4096, "cuda")

    def apart(x, sync=False):
        x = fp8_k.fp8_linear(x, wo, so, None, kernel, counts=counts_o)
        h = silu_and_mul(fp8_k.fp8_linear(x, w1, s1, None, kernel))
        if sync:
            torch.cuda.synchronize()
        return fp8_k.fp8_linear(fp8_k.fp8_linear(h, w2, s2, None, kernel, counts=counts), wo, so, None, kernel)

    def fused(x):
        x = fp8_k.fp8_linear(x, wo, so, None, kernel, counts=counts_o)
        return fp8_k.fp8_linear(fp8_k.fp8_mlp_one_row(x, w1, s1, w2, s2, counts=counts), wo, so, None, kernel)

    for _ in range(3):
        x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16) * 2
        want = apart(x)
        got, replayed = fused(x), _graph_replay(lambda x=x: fused(x))
        assert torch.isfinite(want).all() and want.abs().max() > 0.1
        assert torch.equal(got, want) and torch.equal(replayed, want), (got - want).abs().max().item()
        assert not counts.any() and not counts_o.any()
    monkeypatch.setattr(fp8_k, "pdl_ok", lambda device: False)
    assert torch.equal(apart(x, sync=True), want)


def test_awq_programmatic_launch_waits_for_its_input(monkeypatch):
    """As the FP8 test above, for the AWQ GEMV: a chain of five (o, o, gate_up, down with the fused
    SiLU, o), each reading the previous one's output, gives the bits of one-at-a-time launches."""
    from nanoslg.core.pdl import pdl_ok
    from nanoslg.model.quant.awq import pack_k
    from nanoslg.model.quant.kernels import awq as awq_k

    g = 128
    torch.manual_seed(0)
    layers = []
    for n, k in [(4096, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (4096, 4096)]:
        qw = pack_k(torch.randint(0, 16, (k, n), device="cuda", dtype=torch.uint8))
        z = torch.randint(0, 16, (k // g, n), device="cuda", dtype=torch.uint8)
        s = (torch.rand(k // g, n, device="cuda") * 0.002 + 0.002).half()
        layers.append((qw, z, s, awq_k.split_counts(n, "cuda"), k == 14336))

    def chain(x, sync=False):
        for qw, z, s, counts, silu_mul in layers:
            x = awq_k.awq_linear(x, qw, z, s, g, counts=counts, silu_mul=silu_mul)
            if sync:
                torch.cuda.synchronize()
        return x

    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    assert pdl_ok(x.device) == (torch.cuda.get_device_capability() >= (9, 0))  # on SM90 the path under test
    got, replayed = chain(x), _graph_replay(lambda: chain(x))
    monkeypatch.setattr(awq_k, "pdl_ok", lambda device: False)
    want = chain(x, sync=True)  # one at a time, nothing launched early
    assert torch.isfinite(want).all() and want.abs().max() > 0.1
    assert torch.equal(got, want) and torch.equal(replayed, want)
    assert not any(c.any() for _, _, _, c, _ in layers)


@FP8_SM
def test_fp8_rows_do_not_depend_on_the_row_count():
    """Up to SKINNY_ROWS rows, a row's output is the same bits whatever rows come with it."""
    from nanoslg.model.quant.fp8 import fp8_kernel, quantize_weight
    from nanoslg.model.quant.kernels.fp8 import SKINNY_ROWS, fp8_linear, split_counts

    n, k = LLAMA_8B["qkv"]
    torch.manual_seed(0)
    wq, ws = quantize_weight(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
    x = torch.randn(SKINNY_ROWS, k, device="cuda", dtype=torch.bfloat16) * 2
    full = fp8_linear(x, wq, ws, None, fp8_kernel(wq))
    counts = split_counts(n, "cuda")
    for m in (1, 2, 5, 16, 17, 33, SKINNY_ROWS):
        assert torch.equal(fp8_linear(x[:m], wq, ws, None, fp8_kernel(wq)), full[:m]), m
        assert torch.equal(fp8_linear(x[:m], wq, ws, None, fp8_kernel(wq), counts=counts), full[:m]), m


@pytest.mark.parametrize("shape", list(LLAMA_8B))
def test_awq_on_llama_shapes(shape):
    """Llama-3.1-8B's linears at group 128 through awq_linear (the table's tiles) against x @ the
    dequantized weight; the same bits again and from a CUDA graph replay."""
    from nanoslg.model.quant.awq import dequantize, pack_k
    from nanoslg.model.quant.kernels.awq import awq_linear, split_counts, tiles

    n, k = LLAMA_8B[shape]
    g = 128
    counts = split_counts(n, "cuda")
    torch.manual_seed(0)
    qw = pack_k(torch.randint(0, 16, (k, n), device="cuda", dtype=torch.uint8))
    z = torch.randint(0, 16, (k // g, n), device="cuda", dtype=torch.uint8)
    s = (torch.rand(k // g, n, device="cuda") * 0.002 + 0.002).half()
    w = dequantize(qw, z, s, g)  # float32 [k, n]
    for m in ROWS:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ w
        out = awq_linear(x, qw, z, s, g)
        err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        assert err < 1e-2, (shape, m, err)
        assert torch.equal(awq_linear(x, qw, z, s, g), out)
        assert torch.equal(_graph_replay(lambda x=x: awq_linear(x, qw, z, s, g)), out)
        # as the layers call it: the GEMV's last split adds the parts, eagerly and from a graph, many
        # times over the same counters
        fused = [awq_linear(x, qw, z, s, g, counts=counts) for _ in range(3)]
        fused.append(_graph_replay(lambda x=x: awq_linear(x, qw, z, s, g, counts=counts)))
        assert all(torch.equal(f, out) for f in fused) and not counts.any(), (shape, m)
        if m == 1:  # x's inputs loaded per packed row, the mask as an argument: the same arithmetic and bits
            for lean in (dict(x_vec=True), dict(mask_arg=True), dict(x_vec=True, mask_arg=True)):
                t = tiles(1, n, k, g, x.device)._replace(**lean)
                assert torch.equal(awq_linear(x, qw, z, s, g, t, counts), out), (shape, lean)
    if shape == "down":  # the GEMV computing silu(gate) * up as it loads it, against the activation kernel
        from nanoslg.model.kernels import silu_and_mul

        h = torch.randn(1, 2 * k, device="cuda", dtype=torch.bfloat16) * 2
        want = awq_linear(silu_and_mul(h), qw, z, s, g, counts=counts)
        got = awq_linear(h, qw, z, s, g, counts=counts, silu_mul=True)
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
        same = (got == want).float().mean().item()
        print(f"\nAWQ down, silu(gate) * up in its loads: {err:.2e} off the activation kernel's, {same:.4f} same bits")
        assert err < 1e-2 and not counts.any()
        assert torch.equal(_graph_replay(lambda: awq_linear(h, qw, z, s, g, counts=counts, silu_mul=True)), got)


# -- on a decisive model ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method",
    [
        "awq",
        pytest.param("fp8", marks=[FP8_SM, FP8_MODEL_XFAIL]),
        pytest.param("fp8-online", marks=[FP8_SM, FP8_MODEL_XFAIL]),
    ],
)
def test_kernels_and_reference_on_a_model(method, ckpts):
    """Greedy tokens through the GPU kernels and through the torch reference path, each within bf16
    noise of the float32 reference on the dequantized weights; their agreement is printed."""
    overrides, ref_path = ckpts[method]
    ps, runs, info = prompts(1), {}, {}
    try:
        for kernels in (True, False):
            quant_base.set_kernels(kernels)
            with LLM(*overrides, "cache=flashinfer", "model.enforce_eager=true", "cache.max_num_tokens=8192") as llm:
                runs[kernels] = [o.token_ids for o in llm.generate(ps, greedy(32))]
                info[kernels] = llm.engine.info["quantization_detail"]
    finally:
        quant_base.set_kernels(True)
    assert ("Triton" if method == "awq" else "_scaled_mm") in info[True] and "reference" in info[False]
    m = reference(ref_path, fp8_acts=method != "awq")
    gap = {k: max_gap(m, ps, runs[k]) for k in runs}
    same = sum(a == b for x, y in zip(runs[True], runs[False]) for a, b in zip(x, y))
    print(
        f"\n{method}: kernels vs torch reference {same}/{32 * len(ps)} greedy tokens equal; max gap to the "
        f"fp32 reference: kernels {gap[True]:.3f}, torch {gap[False]:.3f} nats ({info[True]})"
    )
    tol = GAP_TOL if method == "awq" else FP8_GAP_TOL
    assert gap[True] < tol and gap[False] < tol


@FP8_SM
@pytest.mark.parametrize("method", ["fp8", "fp8-online", "fp8-kv", "fp8-kv-cuda-cores"])
def test_fp8_picks_at_fixed_prefixes(method, ckpts, base):
    """The model-level FP8 check without trajectories: at 96 fixed prefixes (the float32 reference's own
    greedy continuations of three prompts) the engine's picks, through the kernels and through the
    torch path, fall below the float32 reference's argmax (mean and worst, in nats) about as far as
    transformers' own bf16 run with the same FP8 rounding does at those prefixes. A near tie then costs
    one position, not the rest of a trajectory (why the checks above cannot pass at 1.0 nats:
    experiments/README.md, ninth wave). Each prefix asks for two tokens and the second is kept where
    the first is the reference's: that pick comes from a decode step (the skinny kernel). fp8-kv: bf16
    weights and an FP8 KV pool, against a reference whose attention reads FP8 K and V (on SM90 its
    decode steps run XQA, which rounds q and the softmax weights to FP8 too); fp8-kv-cuda-cores: the
    same through FlashInfer's CUDA-core kernel, which upcasts the pool instead."""
    if method.startswith("fp8-kv"):  # bf16 weights, an FP8 pool; the reference's attention reads FP8 K/V
        overrides, ref_path, acts, kv = [f"model.path={base}", "cache.kv_dtype=fp8_e4m3"], base, False, True
        if method == "fp8-kv-cuda-cores":
            overrides.append("cache.flashinfer_decode=cuda_cores")
    else:
        (overrides, ref_path), acts, kv = ckpts[method], True, False
    ref, half = reference(ref_path, acts, kv), reference(ref_path, acts, kv, dtype=torch.bfloat16)
    ps, n = prompts(1), 32
    with torch.no_grad():
        conts = [ref.generate(torch.tensor([p], device="cuda"), max_new_tokens=n + 1, min_new_tokens=n + 1,
                              do_sample=False)[0, len(p):].tolist() for p in ps]  # fmt: skip
        logps = [torch.log_softmax(ref(torch.tensor([p + c], device="cuda")).logits[0, len(p) - 1 :].float(), -1)
                 for p, c in zip(ps, conts)]  # fmt: skip
        own_picks = [half(torch.tensor([p + c], device="cuda")).logits[0, len(p) - 1 :].argmax(-1).tolist()
                     for p, c in zip(ps, conts)]  # fmt: skip
    # Prefix p + c[:i] of prompt j: the first pick is position i's (a prefill step), the second is
    # position i + 1's (a decode step) where the first pick is c[i], so that its prefix is fixed too.
    prefixes = [(j, i) for j in range(len(ps)) for i in range(n)]
    picks: dict = {}
    try:
        for kernels in (True, False):
            quant_base.set_kernels(kernels)
            eager = () if kernels else ("model.enforce_eager=true",)  # the kernels as served: graphs, overlap
            with LLM(*overrides, "cache=flashinfer", "cache.max_num_tokens=16384", *eager) as llm:
                outs = llm.generate([ps[j] + conts[j][:i] for j, i in prefixes], greedy(2))
            first = [(j, i, o.token_ids[0]) for (j, i), o in zip(prefixes, outs)]
            second = [(j, i + 1, o.token_ids[1]) for (j, i), o in zip(prefixes, outs) if o.token_ids[0] == conts[j][i]]
            picks[kernels] = (first, second)
    finally:
        quant_base.set_kernels(True)

    def gaps(entries) -> torch.Tensor:
        return torch.tensor([(logps[j][pos].max() - logps[j][pos, t]).item() for j, pos, t in entries])

    own = gaps([(j, pos, own_picks[j][pos]) for j in range(len(ps)) for pos in range(n + 1)])
    ours = {k: gaps(first + second) for k, (first, second) in picks.items()}
    kept = {k: len(second) for k, (_, second) in picks.items()}
    print(
        f"\n{method} at {len(prefixes)} fixed prefixes (decode picks kept {kept[True]} / {kept[False]}): gap to the "
        f"fp32 argmax, mean / max: kernels {ours[True].mean():.3f} / {ours[True].max():.3f}, torch path "
        f"{ours[False].mean():.3f} / {ours[False].max():.3f}, transformers bf16 {own.mean():.3f} / {own.max():.3f} nats"
    )
    assert min(kept.values()) >= len(prefixes) // 3, kept
    for k, g in ours.items():  # a wrong kernel picks at random: a mean gap of several nats
        assert g.mean() <= 1.5 * own.mean() + 0.1 and g.max() <= own.max() + GAP_TOL, (k, g.mean(), g.max())


@FP8_SM
@FP8_MODEL_XFAIL
def test_fp8_kv_against_bf16_kv(base):
    """FlashInfer with an FP8 pool: twice the tokens in the same memory; greedy tokens scored by the
    float32 reference whose attention reads FP8 K/V; agreement with the bf16 pool printed."""
    ps, runs, tokens = prompts(2), {}, {}
    for kv in ("auto", "fp8_e4m3"):
        with LLM(f"model.path={base}", "cache=flashinfer", f"cache.kv_dtype={kv}", "model.enforce_eager=true") as llm:
            runs[kv] = [o.token_ids for o in llm.generate(ps, greedy(32))]
            tokens[kv] = llm.engine.info["kv_tokens"]
    same = sum(a == b for x, y in zip(runs["auto"], runs["fp8_e4m3"]) for a, b in zip(x, y))
    gap = max_gap(reference(base, fp8_acts=False, fp8_kv=True), ps, runs["fp8_e4m3"])
    print(
        f"\nfp8 KV vs bf16 KV: {same}/{32 * len(ps)} greedy tokens equal; pool {tokens['fp8_e4m3']} vs "
        f"{tokens['auto']} tokens; max gap to the fp32 FP8-KV reference {gap:.3f} nats"
    )
    assert 1.9 < tokens["fp8_e4m3"] / tokens["auto"] < 2.1
    assert gap < FP8_GAP_TOL


@pytest.mark.parametrize("method", [pytest.param("fp8", marks=FP8_SM), "awq", "awq cuda_cores"])
def test_cuda_graphs_and_overlap_change_no_token(method, ckpts):
    """Quantized weights and an FP8 pool: decode through captured CUDA graphs (padded buckets, the
    cascade variant over a shared prefix) with overlapped steps gives the tokens of eager,
    one-step-at-a-time decoding."""
    # Overlap keeps a just-finished sequence in the next step and graphs pad to a bucket, so the two
    # runs see different row counts: this holds only because fp8_linear gives a row the same bits at
    # any row count up to SKINNY_ROWS (test_fp8_rows_do_not_depend_on_the_row_count). With a one-row
    # FMA path next to the tensor-core one it failed on an H100 (experiments/low-precision/).
    overrides = list(ckpts[method.split()[0]][0])
    if method.endswith("cuda_cores"):  # on SM90 auto runs the FP8 pool's decode steps through XQA
        overrides.append("cache.flashinfer_decode=cuda_cores")
    g = torch.Generator().manual_seed(3)
    batch = [torch.randint(3, 1024, (n,), generator=g).tolist() for n in (3, 17, 40, 90, 130)] * 4
    shared = torch.randint(3, 1024, (304,), generator=g).tolist()
    cascade = [shared + torch.randint(3, 1024, (n,), generator=g).tolist() for n in range(1, 11)]
    runs = {}
    for eager, overlap in (("true", "false"), ("false", "true")):
        with LLM(
            *overrides,
            "cache=flashinfer",
            "cache.kv_dtype=fp8_e4m3",
            f"model.enforce_eager={eager}",
            f"scheduler.overlap={overlap}",
            "cache.max_num_tokens=16384",
            "scheduler.max_num_seqs=32",
        ) as llm:
            assert (llm.engine.executor.rt.runner.graphs is None) == (eager == "true")
            runs[eager] = [o.token_ids for o in llm.generate(batch, greedy(24))]
            llm.generate(cascade[:1], greedy(1))  # caches the shared prefix
            runs[eager, "cascade"] = [o.token_ids for o in llm.generate(cascade, greedy(24))]
            runs[eager, "steps"] = llm.engine.executor.rt.backend.cascade_steps
    assert runs["false", "steps"] > 0
    assert runs["false"] == runs["true"] and runs["false", "cascade"] == runs["true", "cascade"]
