"""report.json (one row per dataset x method x seed x budget, the cell ids of every split, the
clustering scores and paired tests) and report.md (the tables a reader wants first)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from scpretrain_dist.evaluate.methods import PEERS
from scpretrain_dist.evaluate.metrics import METRICS, UNKNOWN_METRICS, paired_wilcoxon


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame([{k: v for k, v in r.items() if k != "split"} for r in rows])
    if "budget" not in df:
        df["budget"] = 0
    return df


def main_rows(rows: list[dict]) -> pd.DataFrame:
    """Rows of the main protocol: each dataset's largest budget (the paper's cap)."""
    df = _frame(rows)
    top = df.groupby("dataset")["budget"].transform("max")
    return df[df["budget"] == top]


def summary(rows: list[dict]) -> pd.DataFrame:
    """Mean of each metric over seeds at the full budget, per dataset and method, plus the mean
    over datasets."""
    df = main_rows(rows)
    per = df.groupby(["dataset", "method"], sort=False)[list(METRICS)].mean().reset_index()
    overall = per.groupby("method", sort=False)[list(METRICS)].mean().reset_index()
    overall.insert(0, "dataset", "MEAN")
    return pd.concat([per, overall], ignore_index=True)


def budget_curve(rows: list[dict], metric: str = "kappa") -> pd.DataFrame:
    """Mean ``metric`` over datasets and seeds per method (rows) and label budget (columns)."""
    df = _frame(rows)
    per = df.groupby(["method", "budget", "dataset"])[metric].mean().reset_index()
    return per.pivot_table(index="method", columns="budget", values=metric, aggfunc="mean")


BASELINES = ("no_pretrain", "logreg")  # always compared with; the peer tools when they ran


def paired_tests(rows: list[dict], a: str = "scpretrain", against=None) -> list[dict]:
    """Paired Wilcoxon signed-rank tests of method ``a`` vs each of ``against`` (default: the
    baselines, and the peer tools that have rows) over the (dataset, seed) pairs, per metric at
    the full budget and for kappa at every budget."""
    df = _frame(rows)
    if against is None:
        ran = set(df["method"])
        against = BASELINES + tuple(p for p in PEERS if p in ran)
    out = []
    full = main_rows(rows)
    for b in against:
        for metric in METRICS:
            out.append({"a": a, "b": b, "metric": metric, "budget": "full", **_pair(full, a, b, metric)})
        for budget in sorted(df.loc[df["method"] == b, "budget"].unique()):  # the budgets b ran at
            out.append({"a": a, "b": b, "metric": "kappa", "budget": int(budget),
                        **_pair(df[df["budget"] == budget], a, b, "kappa")})
    return out


def _pair(df: pd.DataFrame, a: str, b: str, metric: str) -> dict:
    wide = df[df["method"].isin([a, b])].pivot_table(index=["dataset", "seed"], columns="method", values=metric)
    if a not in wide or b not in wide:
        return {"n": 0, "mean_diff": float("nan"), "wins": 0, "losses": 0, "p_value": float("nan")}
    wide = wide.dropna()
    return paired_wilcoxon(wide[a].to_numpy(), wide[b].to_numpy())


def unknown_summary(rows: list[dict]) -> tuple[pd.DataFrame, list[str]]:
    """Per method, the held-out-type metrics averaged over seeds and then over held-out types
    (and queries), and the columns to show."""
    df = _frame([r for r in rows if "held_out" in r])
    cols = [c for c in (*UNKNOWN_METRICS, *(f"unknown_auroc_{s}" for s in ("confidence", "max_logit", "energy")))
            if c in df]
    per = df.groupby(["dataset", "method"], sort=False)[cols].mean().reset_index()
    out = per.groupby("method", sort=False)[cols].mean().reset_index()
    out.insert(1, "held_out_types", per.groupby("method", sort=False).size().to_numpy())
    return out, ["method", "held_out_types", *cols]


def class_auprc_table(rows: list[dict]) -> pd.DataFrame:
    """Per dataset and class of the main protocol's rows: its training cells (mean over seeds)
    and each method's AUPRC (mean over seeds), the terms the macro AUPRC averages. Empty where
    the rows carry no ``auprc_by_class``."""
    long = [{"dataset": r["dataset"], "method": r["method"], "class": c, "auprc": ap,
             "training cells": r["n_train_by_class"][c]}
            for r in main_rows(rows).to_dict("records") if isinstance(r.get("auprc_by_class"), dict)
            for c, ap in r["auprc_by_class"].items()]
    if not long:
        return pd.DataFrame()
    long_df = pd.DataFrame(long)
    table = long_df.pivot_table(index=["dataset", "class"], columns="method", values="auprc", aggfunc="mean", sort=False)
    cells = long_df.groupby(["dataset", "class"], sort=False)["training cells"].mean()
    table.insert(0, "training cells", [f"{v:.3g}" for v in cells.reindex(table.index)])
    return table.reset_index()


def transfer_matrix(rows: list[dict]) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Of a pairwise transfer (rows named "<reference> -> <query>"), per method: the mean over
    pairs of accuracy and macro-F1 (each pair's mean over seeds first) and the worst pair; and
    {method: reference x query accuracy}. Empty without such rows."""
    pair = [r for r in rows if "held_out" not in r and r.get("query") and r.get("references")
            and r["dataset"] == f"{r['references']} -> {r['query']}"]
    if not pair:
        return pd.DataFrame(), {}
    df = main_rows(pair)
    per = df.groupby(["method", "references", "query"], sort=False)[["accuracy", "macro_f1"]].mean().reset_index()
    out = []
    for method, g in per.groupby("method", sort=False):
        worst = g.loc[g["accuracy"].idxmin()]
        out.append({"method": method, "pairs": len(g), "accuracy": g["accuracy"].mean(),
                    "macro_f1": g["macro_f1"].mean(), "worst_pair": f"{worst['references']} -> {worst['query']}",
                    "worst_accuracy": worst["accuracy"]})
    grids = {m: g.pivot(index="references", columns="query", values="accuracy")
             for m, g in per.groupby("method", sort=False)}
    return pd.DataFrame(out), grids


def format_table(rows: list[dict]) -> str:
    s = summary(rows)
    header = f"{'dataset':30s} {'method':12s} " + " ".join(f"{m:>11s}" for m in METRICS)
    lines = [header, "-" * len(header)]
    for _, r in s.iterrows():
        lines.append(f"{r['dataset']:30s} {r['method']:12s} " + " ".join(f"{r[m]:11.3f}" for m in METRICS))
    curve = budget_curve(rows)
    if curve.shape[1] > 1:
        lines += ["", "kappa by label budget (mean over datasets and seeds):",
                  f"{'method':12s} " + " ".join(f"{int(b):>7d}" for b in curve.columns)]
        for m, r in curve.iterrows():
            lines.append(f"{m:12s} " + " ".join("    n/a" if np.isnan(v) else f"{v:7.3f}" for v in r))
    return "\n".join(lines)


def _md_table(df: pd.DataFrame, cols: list[str], fmt: str = "{:.3f}") -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        out.append("| " + " | ".join(fmt.format(r[c]) if isinstance(r[c], (float, np.floating)) else str(r[c]) for c in cols) + " |")
    return out


def write_report(
    rows: list[dict],
    out_dir: str | Path,
    context: dict | None = None,
    splits: list[dict] | None = None,
    clustering: list[dict] | None = None,
    figures: list[str] | None = None,
    confusion: dict | None = None,
) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = [{k: v for k, v in r.items() if k != "split"} for r in rows]
    tests = paired_tests(rows) if any(r["method"] == "scpretrain" for r in rows) else []
    js = out / "report.json"
    js.write_text(json.dumps({"context": context or {}, "rows": results, "splits": splits or [],
                              "clustering": clustering or [], "paired_tests": tests,
                              "figures": figures or [], "confusion": confusion or {}},
                             indent=1, default=_default))
    md = out / "report.md"
    seeds = sorted({r["seed"] for r in rows})
    text = ["# scPretrain evaluation", ""]
    for k, v in (context or {}).items():
        text.append(f"- **{k}**: {v}")
    text += ["", f"## Main protocol (largest label budget), mean over seeds {seeds}", ""]
    text += _md_table(summary(rows), ["dataset", "method", *METRICS])
    curve = budget_curve(rows)
    if curve.shape[1] > 1:
        text += ["", "## Kappa by labelled training cells (mean over datasets and seeds)", "",
                 "A budget above a dataset's training split uses the whole split (min(1000, 0.6 n) cells).", ""]
        c = curve.reset_index()
        c.columns = [str(x) for x in c.columns]
        text += _md_table(c, list(c.columns))
    if tests:
        text += ["", "## Paired Wilcoxon signed-rank tests over (dataset, seed)", ""]
        text += _md_table(pd.DataFrame(tests), ["a", "b", "metric", "budget", "n", "mean_diff", "wins", "losses", "p_value"],
                          "{:.4f}")
    by_class = class_auprc_table(rows)
    if len(by_class):
        text += ["", "## AUPRC by class (largest budget, mean over seeds)", "",
                 "The terms of the macro AUPRC: a class with one test cell scores 1 / that cell's rank.", ""]
        text += _md_table(by_class, [str(c) for c in by_class.columns], "{:.3f}")
    matrix, grids = transfer_matrix(rows)
    if len(matrix):
        text += ["", "## Transfer matrix: each reference alone to each query", "",
                 "Accuracy and macro-F1 averaged over seeds per pair, then over pairs; the worst pair by "
                 "accuracy. Heat-maps: `transfer_matrix_<method>.png`.", ""]
        text += _md_table(matrix, ["method", "pairs", "accuracy", "macro_f1", "worst_pair", "worst_accuracy"])
        if "scpretrain" in grids:
            g = grids["scpretrain"]
            text += ["", "scpretrain accuracy, reference (rows) x query (columns):", ""]
            text += ["| reference | " + " | ".join(map(str, g.columns)) + " |", "|---|" + "---|" * len(g.columns)]
            text += [f"| {ref} | " + " | ".join("" if np.isnan(v) else f"{v:.3f}" for v in g.loc[ref]) + " |"
                     for ref in g.index]
    if any("held_out" in r for r in rows):
        text += ["", "## Unknown cells: each type held out of the references in turn", "",
                 "The query's cells of the held-out type should be rejected; `unknown_auroc`: the AUROC of "
                 "a low score at finding them, of the score each method rejects on (scPretrain: "
                 "`finetune.reject_score`, energy by default; the others: the largest probability); "
                 "`_confidence`, `_max_logit`, `_energy`: each score of the networks; "
                 "`unknown_rejected` / `known_rejected`: the fractions of unknown / known cells each method's "
                 "own rule rejects (scPretrain: the model's threshold from its validation cells; CellTypist: no "
                 "type above p_thres 0.5); `known_accuracy` / `accepted_accuracy`: accuracy on every known "
                 "cell / on the known cells accepted.", ""]
        text += _md_table(*unknown_summary(rows))
    guarded = [r for r in rows if "ssl_fallback" in r and not r["method"].endswith("+shift")]
    if guarded:
        text += ["", "## Semi-supervised guard", "",
                 "`ssl_fallback`: the semi-supervised model failed the guard (checked without query labels) and "
                 "its row is the supervised scpretrain model's; `ssl_guard` says why.", ""]
        text += ["| dataset | seed | ssl_fallback | val accuracy supervised / semi | agreement | ssl_guard |",
                 "|---|---|---|---|---|---|"]
        text += [f"| {r['dataset']} | {r['seed']} | {str(r['ssl_fallback']).lower()} | "
                 f"{r['ssl_val_accuracy_supervised']:.3f} / {r['ssl_val_accuracy_semi']:.3f} | "
                 f"{r['ssl_agreement']:.3f} | {r['ssl_guard']} |" for r in guarded]
    if clustering:
        cl = pd.DataFrame(clustering).groupby(["dataset", "space"], sort=False)[["rand", "ari"]].mean().reset_index()
        text += ["", "## K-means with k = number of true types (Rand index, ARI)", ""]
        text += _md_table(cl, ["dataset", "space", "rand", "ari"])
    for query, by_method in (confusion or {}).items():
        for method, table in by_method.items():
            if method not in ("scpretrain", "scpretrain+shift", "logreg"):
                continue
            preds = sorted({p for row in table.values() for p in row})
            text += ["", f"## {query}: true (rows) vs predicted (columns), {method}, first seed", ""]
            text += ["| true | " + " | ".join(preds) + " |", "|---|" + "---|" * len(preds)]
            text += [f"| {t} | " + " | ".join(str(row.get(p, 0)) for p in preds) + " |" for t, row in table.items()]
    if figures:
        text += ["", "## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    md.write_text("\n".join(text) + "\n")
    return js, md


def _default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
