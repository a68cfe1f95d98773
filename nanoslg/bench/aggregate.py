"""A folder of bench records aggregated: tables and a plot, never mixing runs that cannot be compared.

experiments/<bench.name>/results.md    one table per sweep: records of one commit, workload and model
experiments/<bench.name>/results.png   the newest sweep: an on/off sweep as bars with the ratio on
                                       them, a numeric one (rate, batch size) as a line over it

A sweep's "Swept:" keys are the config keys whose values differ between its records, leaving out
keys that change no result (progress bars, output folders, the server's port).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("nanoslg.bench")

# Keys that differ between runs of one sweep without changing what was measured.
IGNORED_KEYS = {
    "bench.name",
    "bench.output_dir",
    "bench.extra.progress",
    "bench.extra.aggregate",
    "bench.extra.server_start_timeout",
    "server.port",
    "server.host",
    "log_level",
    "hydra",
    "mode",
    "experiment",
}


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


def model_label(rec: dict) -> str:
    """The model a record ran: its checkpoint folder's name, else the bundled shape or config name."""
    m = (rec.get("config") or {}).get("model") or {}
    if m.get("path"):
        return Path(str(m["path"]).rstrip("/")).name
    return str(m.get("shape") or m.get("name") or "unknown model")


def sweep_of(rec: dict) -> tuple[str, str, str]:
    """(commit, workload, model): records are compared only within one."""
    commit = ((rec.get("git") or {}).get("commit") or "unknown commit")[:8]
    return commit, str(rec.get("workload")), model_label(rec)


def sweeps(records: list[dict]) -> list[tuple[tuple[str, str, str], list[dict]]]:
    """Records grouped by sweep_of, each group in time order, the groups by their first record."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in records:
        groups.setdefault(sweep_of(r), []).append(r)
    return list(groups.items())


def swept_keys(records: list[dict]) -> list[str]:
    """The config keys whose values differ between the records (of one sweep)."""
    if len(records) < 2:
        return []
    flat = [flatten(r.get("config", {})) for r in records]
    keys = sorted({k for f in flat for k in f})
    return [k for k in keys if not _ignored(k) and len({json.dumps(f.get(k), default=str) for f in flat}) > 1]


def swept_value(rec: dict, key: str) -> Any:
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
    ("accepted len", "engine.speculative.mean_accepted_length", "{:.2f}"),  # speculative decoding
    ("wall s", "wall_time_s", "{:.2f}"),
]
PLOTTED = [("output tok/s", "output_tok_s"), ("TTFT p50 (ms)", "ttft_ms.p50")]


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "–"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


OPTIONAL = {"accepted len"}  # columns shown only where some record of the table has the figure


def table(records: list[dict], keys: list[str]) -> str:
    cols = [
        c for c in COLUMNS if c[0] not in OPTIONAL or any(_get(r.get("results", {}), c[1]) is not None for r in records)
    ]
    head = keys + [c[0] for c in cols] + ["record"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        res = r.get("results", {})
        cells = [str(swept_value(r, k)) for k in keys]
        for _, path, fmt in cols:
            v = _get(res, path)
            if path == "e2e_ms.p50" and v is not None:
                v = v / 1000.0  # seconds read better for whole requests
            cells.append(_fmt(v, fmt))
        cells.append(r["_file"])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def aggregate(folder: Path | str) -> dict | None:
    """Writes results.md (every sweep) and results.png (the newest). Returns their paths."""
    folder = Path(folder)
    records = load_records(folder)
    if not records:
        return None
    groups = sweeps(records)
    parts = [f"# {folder.name}: {len(records)} run(s) in {len(groups)} sweep(s)\n"]
    for (commit, workload, model), recs in reversed(groups):  # the newest first
        keys = swept_keys(recs)
        parts.append(f"\n## {model}, {workload}, commit {commit}: {len(recs)} run(s)\n")
        parts.append(f"\nSwept: {', '.join(keys)}\n" if keys else "\nSwept: nothing (repeated runs)\n")
        parts.append("\n" + table(recs, keys))
    md = folder / "results.md"
    md.write_text("".join(parts))
    png: Path | None = folder / "results.png"
    try:
        import matplotlib  # noqa: F401  (optional: the `bench` extra)
    except ImportError:
        log.warning("matplotlib is not installed: wrote %s without a plot", md)
        png = None
    if png is not None:
        (commit, workload, model), recs = groups[-1]
        plot(recs, swept_keys(recs), png, f"{folder.name}: {model}, {workload}, commit {commit}")
    return {"table": str(md), "plot": str(png) if png else None}


def plot_kind(records: list[dict], keys: list[str]) -> str:
    """ "ratio" (one key, two values such as on/off: bars and their ratio), "line" (one numeric key),
    or "bars" (anything else: one bar per run or combination)."""
    if len(keys) != 1:
        return "bars"
    values = {json.dumps(swept_value(r, keys[0])) for r in records}
    if len(values) == 2 and all(isinstance(swept_value(r, keys[0]), bool) for r in records):
        return "ratio"
    if all(_num(swept_value(r, keys[0])) is not None for r in records):
        return "line"
    return "bars"


def points(records: list[dict], keys: list[str]) -> list[tuple[str, Any, dict]]:
    """(label, x value, record) per swept value or run; the newest record of a value wins."""
    latest: dict[str, tuple[Any, dict]] = {}
    for r in records:
        label = ", ".join(f"{k}={swept_value(r, k)}" for k in keys) if keys else r["_file"][:15]
        latest[label] = (swept_value(r, keys[0]) if len(keys) == 1 else label, r)
    return [(label, x, r) for label, (x, r) in latest.items()]


def ratio_label(on: float | None, off: float | None) -> str | None:
    """How the True run compares with the False one, written on the True bar."""
    if on is None or not off:
        return None
    return f"{on / off:.2f}x off"


def plot(records: list[dict], keys: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    kind = plot_kind(records, keys)
    pts = points(records, keys)
    if kind == "line":
        pts.sort(key=lambda p: float(p[1]))
    elif kind == "ratio":
        pts.sort(key=lambda p: p[1])  # False (off) first, then True (on)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, (name, metric) in zip(axes, PLOTTED):
        ys = [_num(_get(r.get("results", {}), metric)) for _, _, r in pts]
        if kind == "line":
            xy = [(float(x), y) for (_, x, _), y in zip(pts, ys) if y is not None]
            ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o")
            ax.set_xlabel(keys[0])
        else:
            labels = [f"{keys[0]}={x}" if kind == "ratio" else label for label, x, _ in pts]
            bars = ax.bar(range(len(pts)), [y or 0.0 for y in ys], color="tab:blue")
            ax.set_xticks(range(len(pts)))
            ax.set_xticklabels(
                labels, rotation=0 if kind == "ratio" else 30, ha="center" if kind == "ratio" else "right"
            )
            if kind == "ratio" and (text := ratio_label(ys[1], ys[0])):
                ax.annotate(text, (bars[1].get_x() + bars[1].get_width() / 2, ys[1]), ha="center", va="bottom")
            ax.set_xlabel(", ".join(keys) if keys else "run")
        ax.set_ylabel(name)
        ax.set_ylim(bottom=0)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
