"""A sweep's records aggregated: one table row per record, and a plot over the swept override.

experiments/<bench.name or workload>/results.md    (one row per record)
experiments/<bench.name or workload>/results.png   (x: the swept override; y: output tok/s, TTFT p50)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("nanoslg.bench")

# Keys that differ between runs of one sweep without being what was swept.
IGNORED_KEYS = {"bench.name", "bench.output_dir", "hydra", "mode"}


def load_records(folder: Path) -> list[dict]:
    recs = []
    for p in sorted((Path(folder) / "records").glob("*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            log.warning("skipping unreadable record %s: %s", p, e)
            continue
        rec["_file"] = p.name
        recs.append(rec)
    recs.sort(key=lambda r: (r.get("time") or "", r["_file"]))
    return recs


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED_KEYS)


def swept_keys(records: list[dict]) -> list[str]:
    """The config keys whose values differ between records: what the sweep varied.

    Hydra overrides name them most readably (`cache=sdpa`), so they are preferred when every
    record has them; otherwise the flattened configs are compared.
    """
    if len(records) < 2:
        return []
    if all(r.get("overrides") is not None for r in records):
        ov = [dict(_split(o) for o in r["overrides"]) for r in records]
        keys = sorted({k for o in ov for k in o})
        diff = [k for k in keys if not _ignored(k.lstrip("+~")) and len({o.get(k) for o in ov}) > 1]
        if diff:
            return diff
    flat = [flatten(r.get("config", {})) for r in records]
    keys = sorted({k for f in flat for k in f})
    return [k for k in keys if not _ignored(k) and len({json.dumps(f.get(k), default=str) for f in flat}) > 1]


def _split(override: str) -> tuple[str, str]:
    k, _, v = override.partition("=")
    return k, v


def swept_value(rec: dict, key: str) -> Any:
    if rec.get("overrides") is not None:
        ov = dict(_split(o) for o in rec["overrides"])
        if key in ov:
            return ov[key]
    return flatten(rec.get("config", {})).get(key)


def _get(d: dict, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


COLUMNS = [  # (header, path in the record's results, format)
    ("output tok/s", "output_tok_s", "{:,.0f}"),
    ("total tok/s", "total_tok_s", "{:,.0f}"),
    ("TTFT p50 ms", "ttft_ms.p50", "{:,.1f}"),
    ("TTFT p99 ms", "ttft_ms.p99", "{:,.1f}"),
    ("ITL p50 ms", "itl_ms.p50", "{:,.2f}"),
    ("TPOT p50 ms", "tpot_ms.p50", "{:,.2f}"),
    ("e2e p50 s", "e2e_ms.p50", "{:,.2f}"),
    ("% of limit", "roofline.percent_of_limit", "{:.1f}%"),
    ("x transformers", "peer.speedup_output_tok_s", "{:.2f}x"),
    ("peak GiB", "peak_gpu_memory.max_allocated_gib", "{:.1f}"),
    ("wall s", "wall_time_s", "{:.2f}"),
]


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "–"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def table(records: list[dict], keys: list[str]) -> str:
    head = keys + ["workload"] + [c[0] for c in COLUMNS] + ["commit", "record"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        res = r.get("results", {})
        cells = [str(swept_value(r, k)) for k in keys] + [str(r.get("workload"))]
        for _, path, fmt in COLUMNS:
            v = _get(res, path)
            if path == "e2e_ms.p50" and v is not None:
                v = v / 1000.0  # seconds read better for whole requests
            cells.append(_fmt(v, fmt))
        commit = (r.get("git") or {}).get("commit")
        cells += [(commit or "–")[:8], r["_file"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def aggregate(folder: Path | str) -> dict | None:
    """Writes results.md and results.png for every record in folder/records. Returns their paths."""
    folder = Path(folder)
    records = load_records(folder)
    if not records:
        return None
    keys = swept_keys(records)
    md = folder / "results.md"
    title = f"# {folder.name}: {len(records)} run(s)\n\n"
    swept = f"Swept: {', '.join(keys)}\n\n" if keys else ""
    md.write_text(title + swept + table(records, keys))
    png: Path | None = folder / "results.png"
    try:
        import matplotlib  # noqa: F401  (optional: the `bench` extra)
    except ImportError:
        log.warning("matplotlib is not installed: wrote %s without a plot", md)
        png = None
    if png is not None:
        plot(records, keys, png, folder.name)
    return {"table": str(md), "plot": str(png) if png else None}


def plot(records: list[dict], keys: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    # One point per swept value: the newest record wins (older ones stay in the table).
    latest: dict[str, dict] = {}
    for r in records:
        label = ", ".join(f"{k}={swept_value(r, k)}" for k in keys) if keys else r["_file"][:15]
        latest[label] = r
    labels = list(latest)
    xs_num = [_num(swept_value(latest[lab], keys[0])) for lab in labels] if len(keys) == 1 else []
    numeric = bool(xs_num) and all(x is not None for x in xs_num)
    if numeric:
        order = sorted(range(len(labels)), key=lambda i: xs_num[i])
        labels = [labels[i] for i in order]
        xs: list = [xs_num[i] for i in order]
    else:
        xs = list(range(len(labels)))
    ys_tok = [_num(_get(latest[lab].get("results", {}), "output_tok_s")) for lab in labels]
    ys_ttft = [_num(_get(latest[lab].get("results", {}), "ttft_ms.p50")) for lab in labels]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, ys, name in ((axes[0], ys_tok, "output tok/s"), (axes[1], ys_ttft, "TTFT p50 (ms)")):
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_ylabel(name)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if numeric:
            ax.set_xlabel(keys[0])
        else:
            ax.set_xticks(xs)
            ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
            ax.set_xlabel(", ".join(keys) if keys else "run")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
