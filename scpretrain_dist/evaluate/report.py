"""report.json (one row per dataset x method x seed, with split cell ids) and report.md."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from scpretrain_dist.evaluate.metrics import METRICS


def summary(rows: list[dict]) -> pd.DataFrame:
    """Mean of each metric over seeds, per dataset and method, plus an overall mean."""
    df = pd.DataFrame([{k: v for k, v in r.items() if k != "split"} for r in rows])
    per = df.groupby(["dataset", "method"], sort=False)[list(METRICS)].mean().reset_index()
    overall = df.groupby("method", sort=False)[list(METRICS)].mean().reset_index()
    overall.insert(0, "dataset", "MEAN")
    return pd.concat([per, overall], ignore_index=True)


def format_table(rows: list[dict]) -> str:
    s = summary(rows)
    header = f"{'dataset':30s} {'method':12s} " + " ".join(f"{m:>11s}" for m in METRICS)
    lines = [header, "-" * len(header)]
    for _, r in s.iterrows():
        lines.append(f"{r['dataset']:30s} {r['method']:12s} " + " ".join(f"{r[m]:11.3f}" for m in METRICS))
    return "\n".join(lines)


def write_report(rows: list[dict], out_dir: str | Path, context: dict | None = None) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = [{k: v for k, v in r.items() if k != "split"} for r in rows]
    splits = [{"dataset": r["dataset"], "seed": r["seed"], **r["split"]} for r in rows if "split" in r]
    unique_splits = list({(s["dataset"], s["seed"]): s for s in splits}.values())
    js = out / "report.json"
    js.write_text(json.dumps({"context": context or {}, "rows": results, "splits": unique_splits}, indent=1, default=_default))
    md = out / "report.md"
    seeds = sorted({r["seed"] for r in rows})
    text = ["# scPretrain evaluation", ""]
    for k, v in (context or {}).items():
        text.append(f"- **{k}**: {v}")
    text += ["", f"Mean over seeds {seeds} of metrics on each target's held-out test cells.", "",
             "| dataset | method | " + " | ".join(METRICS) + " |",
             "|---|---|" + "---|" * len(METRICS)]
    for _, r in summary(rows).iterrows():
        text.append(f"| {r['dataset']} | {r['method']} | " + " | ".join(f"{r[m]:.3f}" for m in METRICS) + " |")
    md.write_text("\n".join(text) + "\n")
    return js, md


def _default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)
