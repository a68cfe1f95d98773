"""The text report a bench run prints: throughput, latency percentiles, memory, roofline, peer."""

from __future__ import annotations

from nanoslg.core.config import Config


def _ms(d: dict | None, key: str) -> str:
    v = (d or {}).get(key)
    return "–" if v is None else f"{v:,.2f}"


def format_report(cfg: Config, r: dict) -> str:
    b, eng = cfg.bench, r.get("engine") or {}
    p = cfg.parallel
    lines = [
        "",
        f"== NanoSLG bench: {b.workload} | model {cfg.model.name} | cache "
        f"{(eng.get('info') or {}).get('cache_backend', cfg.cache.backend)} | parallel {p.mode} "
        f"(tp={p.tp_size}, pp={p.pp_size}) ==",
    ]

    def row(label: str, text: str) -> None:
        lines.append(f"{label:<16} {text}")

    errors = f"  (first error: {r['errors'][0]})" if r.get("errors") else ""
    row("requests", f"{r['completed']} completed, {r['failed']} failed{errors}")
    row("tokens", f"{r['input_tokens']:,} in, {r['output_tokens']:,} out")
    row("wall time", f"{r['wall_time_s']:.2f} s")
    row("throughput", f"{r['output_tok_s']:,.1f} output tok/s | {r['total_tok_s']:,.1f} total tok/s | "
                      f"{r['request_throughput']:.2f} req/s")  # fmt: skip
    row("latency (ms)", " ".join(f"{k:>10}" for k in ("mean", "p50", "p90", "p99")))
    for name, key in (("TTFT", "ttft_ms"), ("ITL", "itl_ms"), ("TPOT", "tpot_ms"), ("e2e", "e2e_ms")):
        row(name, " ".join(f"{_ms(r.get(key), q):>10}" for q in ("mean", "p50", "p90", "p99")))
    mem = r.get("peak_gpu_memory")
    if mem and mem.get("source"):
        row("peak GPU memory", f"{mem['max_allocated_gib']:.2f} GiB allocated ({mem['source']})")
    elif mem:
        row("peak GPU memory", f"{mem['max_allocated_gib']:.2f} GiB allocated "
                               f"({mem['max_reserved_gib']:.2f} GiB reserved; torch, this process)")  # fmt: skip
    else:
        row("peak GPU memory", "– (no CUDA in this process)")
    kv = r.get("kv_pool") or {}
    tokens = f"{kv['tokens']:,} tokens" if kv.get("tokens") else "–"
    row("KV pool", tokens + (f", {kv['gib']:.2f} GiB" if kv.get("gib") else ""))
    _roofline(row, r.get("roofline"), bool(eng.get("speculative")))
    peer = r.get("peer")
    if peer:
        row("transformers", f"{peer['output_tok_s']:,.1f} output tok/s, TTFT p50 {_ms(peer.get('ttft_ms'), 'p50')} "
                            f"ms ({peer['transformers']}, {peer['method']})")  # fmt: skip
        if peer.get("speedup_output_tok_s"):
            row("", f"-> NanoSLG is {peer['speedup_output_tok_s']:.2f}x transformers in output tok/s")
    prof = eng.get("step_profile")
    if prof and prof.get("steps"):
        row("step profile", f"{prof['steps']:,} steps; per step: schedule {prof['schedule_ms']:.2f} ms, process "
                            f"outputs {prof['process_ms']:.2f} ms, launch {prof['launch_ms']:.2f} ms, wait for the "
                            f"device {prof['wait_ms']:.2f} ms")  # fmt: skip
        if prof.get("draft_ms"):
            row("", f"of the device wait, the draft model's proposals: {prof['draft_ms']:.2f} ms per step")
        if prof.get("masks_ms"):
            row("", f"grammar masks filled on their own thread: {prof['masks_ms']:.2f} ms per step")
    spec = eng.get("speculative")
    if spec:
        rate, mal = spec.get("acceptance_rate"), spec.get("mean_accepted_length")
        row("speculative", f"{spec['method']}, k={spec['num_tokens']}: {spec['drafts']:,} verify rows, "
                           f"{spec['proposed']:,} tokens proposed, {spec['accepted']:,} accepted"
                           + (f" ({rate:.0%})" if rate is not None else "")
                           + (f"; mean accepted length {mal:.2f} tokens per step" if mal else ""))  # fmt: skip
    if eng.get("cascade_steps"):
        row("cascade attention", f"{eng['cascade_steps']:,} decode steps read a prefix every sequence shared once")
    cold = r.get("cold_start")
    if cold and cold.get("first_token_s") is not None:
        row("cold start", f"{cold['first_token_s']:.1f} s from spawning the server to its first token "
                          f"(/health after {cold['server_ready_s']:.1f} s)")  # fmt: skip
        slog = cold.get("server_log") or {}
        if "serving_after_run_py_s" in slog and "engine_built_s" in slog:
            phases = ", ".join(f"{k} {v:.2f}" for k, v in slog.get("engine_phases_s", {}).items())
            built = f"the engine built in {slog['engine_built_s']:.1f} s ({phases} s)"
            read = slog.get("config_read_after_run_py_s")
            head, rest = (
                (f"config read after {read:.1f} s, ", "the app and its socket")
                if read is not None
                else ("", "imports, config")
            )
            row("", f"server log: {head}serving {slog['serving_after_run_py_s']:.1f} s after run.py started, {built}; "
                    f"the rest: {rest}")  # fmt: skip
    chunks = r.get("stream_chunks")
    if chunks is not None and chunks < 0.9 * r["output_tokens"]:
        row("note", f"the server sent {chunks:,} stream chunks for {r['output_tokens']:,} tokens: TTFT/ITL are per "
                    "chunk (it holds back deltas without text)")  # fmt: skip
    row("record", str(r.get("record")))
    if r.get("aggregate"):
        row("sweep table", f"{r['aggregate']['table']} (plot {r['aggregate']['plot']})")
    return "\n".join(lines) + "\n"


def _roofline(row, roof: dict | None, speculative: bool = False) -> None:
    if not roof:
        row("roofline", "– (no model shape or hardware figures)")
        return
    mem, comp = roof["memory_s"], roof["compute_s"]
    row("roofline", f"limit {roof['limit_s']:.3f} s ({roof['bound_by']}-bound; memory {mem:.3f} s, compute "
                    f"{comp:.3f} s, no-overlap sum {mem + comp:.3f} s; {roof['steps']:,} steps est.)")  # fmt: skip
    limit = f" (limit {roof['limit_output_tok_s']:,.0f} output tok/s)" if roof.get("limit_output_tok_s") else ""
    row("", f"-> {roof['percent_of_limit']:.1f}% of the limit{limit}")
    row("", f"figures: {roof['figures']}")
    m = roof["model"]
    n = m["num_params"]
    size = f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"
    row("", f"model: {size} params x {m['dtype_bytes']} bytes, KV {m['kv_bytes_per_token'] / 1024:.1f} KiB/token "
            f"({m['source']})")  # fmt: skip
    if roof.get("mbu_percent") is not None:
        # Speculation emits several tokens per read of the weights: the share can pass 100%.
        what = "of the one-token-a-forward limit " if speculative else ""
        row("batch-1 decode", f"{roof['decode_tok_s']:,.1f} tok/s; MBU {roof['mbu_percent']:.1f}% {what}"
                              f"(limit {roof['decode_limit_tok_s']:,.0f} tok/s)")  # fmt: skip
