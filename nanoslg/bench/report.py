"""The text report a bench run prints: throughput, latency percentiles, memory, roofline, peer."""

from __future__ import annotations

from nanoslg.core.config import Config


def _ms(d: dict | None, key: str) -> str:
    v = (d or {}).get(key)
    return "–" if v is None else f"{v:,.2f}"


def format_report(cfg: Config, r: dict) -> str:
    b = cfg.bench
    eng = (r.get("engine") or {}).get("info") or {}
    lines = [
        "",
        f"== NanoSLG bench: {b.workload} | model {cfg.model.name} | cache {eng.get('cache_backend', cfg.cache.backend)}"
        f" | parallel {cfg.parallel.mode} (tp={cfg.parallel.tp_size}, pp={cfg.parallel.pp_size}) ==",
        f"requests         {r['completed']} completed, {r['failed']} failed"
        + (f"  (first error: {r['errors'][0]})" if r.get("errors") else ""),
        f"tokens           {r['input_tokens']:,} in, {r['output_tokens']:,} out",
        f"wall time        {r['wall_time_s']:.2f} s",
        f"throughput       {r['output_tok_s']:,.1f} output tok/s | {r['total_tok_s']:,.1f} total tok/s | "
        f"{r['request_throughput']:.2f} req/s",
        f"{'latency (ms)':<16} {'mean':>10} {'p50':>10} {'p90':>10} {'p99':>10}",
    ]
    for name, key in (("TTFT", "ttft_ms"), ("ITL", "itl_ms"), ("TPOT", "tpot_ms"), ("e2e", "e2e_ms")):
        d = r.get(key)
        lines.append(f"{name:<16} {_ms(d, 'mean'):>10} {_ms(d, 'p50'):>10} {_ms(d, 'p90'):>10} {_ms(d, 'p99'):>10}")
    mem = r.get("peak_gpu_memory")
    if mem and mem.get("source"):
        lines.append(f"peak GPU memory  {mem['max_allocated_gib']:.2f} GiB allocated ({mem['source']})")
    else:
        lines.append(
            "peak GPU memory  "
            + (
                f"{mem['max_allocated_gib']:.2f} GiB allocated "
                f"({mem['max_reserved_gib']:.2f} GiB reserved; torch, this process)"
                if mem
                else "– (no CUDA in this process)"
            )
        )
    kv = r.get("kv_pool") or {}
    lines.append(
        "KV pool          "
        + (f"{kv['tokens']:,} tokens" if kv.get("tokens") else "–")
        + (f", {kv['gib']:.2f} GiB" if kv.get("gib") else "")
    )
    roof = r.get("roofline")
    if roof:
        pct = roof.get("percent_of_limit")
        lines.append(
            f"roofline         limit {roof['limit_s']:.3f} s ({roof['bound_by']}-bound; memory "
            f"{roof['memory_s']:.3f} s, compute {roof['compute_s']:.3f} s, no-overlap sum "
            f"{roof['memory_s'] + roof['compute_s']:.3f} s; {roof['steps']:,} steps est.)"
        )
        lines.append(
            f"                 -> {pct:.1f}% of the limit"
            + (f" (limit {roof['limit_output_tok_s']:,.0f} output tok/s)" if roof.get("limit_output_tok_s") else "")
        )
        lines.append(f"                 figures: {roof['figures']}")
        m = roof["model"]
        n = m["num_params"]
        size = f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"
        lines.append(
            f"                 model: {size} params x {m['dtype_bytes']} bytes, "
            f"KV {m['kv_bytes_per_token'] / 1024:.1f} KiB/token ({m['source']})"
        )
        if roof.get("mbu_percent") is not None:
            lines.append(
                f"batch-1 decode   {roof['decode_tok_s']:,.1f} tok/s; MBU {roof['mbu_percent']:.1f}% "
                f"(limit {roof['decode_limit_tok_s']:,.0f} tok/s)"
            )
    else:
        lines.append("roofline         – (no model shape or hardware figures)")
    peer = r.get("peer")
    if peer:
        ratio = peer.get("speedup_output_tok_s")
        lines.append(
            f"transformers     {peer['output_tok_s']:,.1f} output tok/s, TTFT p50 "
            f"{_ms(peer.get('ttft_ms'), 'p50')} ms ({peer['transformers']}, {peer['method']})"
        )
        if ratio:
            lines.append(f"                 -> NanoSLG is {ratio:.2f}x transformers in output tok/s")
    prof = (r.get("engine") or {}).get("step_profile")
    if prof and prof.get("steps"):
        lines.append(
            f"step profile     {prof['steps']:,} steps; per step: schedule {prof['schedule_ms']:.2f} ms, "
            f"process outputs {prof['process_ms']:.2f} ms, launch {prof['launch_ms']:.2f} ms, "
            f"wait for the device {prof['wait_ms']:.2f} ms"
        )
    cascade = (r.get("engine") or {}).get("cascade_steps")
    if cascade:
        lines.append(f"cascade attention {cascade:,} decode steps read a prefix every sequence shared once")
    cold = r.get("cold_start")
    if cold and cold.get("first_token_s") is not None:
        lines.append(
            f"cold start       {cold['first_token_s']:.1f} s from spawning the server to its first token "
            f"(/health after {cold['server_ready_s']:.1f} s)"
        )
    chunks = r.get("stream_chunks")
    if chunks is not None and chunks < 0.9 * r["output_tokens"]:
        lines.append(
            f"note             the server sent {chunks:,} stream chunks for {r['output_tokens']:,} tokens: "
            "TTFT/ITL are per chunk (it holds back deltas without text)"
        )
    lines.append(f"record           {r.get('record')}")
    if r.get("aggregate"):
        lines.append(f"sweep table      {r['aggregate']['table']} (plot {r['aggregate']['plot']})")
    return "\n".join(lines) + "\n"
