"""The report's figures (PNG): pretrained vs not per target (the paper's Fig. 2), UMAPs of the
embedding vs PCA (Fig. 3), classifiers on embeddings vs PCA (Fig. 4), kappa vs label budget."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

FIG2_METRICS = ("accuracy", "kappa", "macro_auprc", "macro_auroc")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pretrained_vs_not(main: pd.DataFrame, path: Path, a: str = "scpretrain", b: str = "no_pretrain") -> Path | None:
    per = main[main["method"].isin([a, b])].groupby(["dataset", "method"])[list(FIG2_METRICS)].mean()
    if per.empty or a not in per.index.get_level_values(1) or b not in per.index.get_level_values(1):
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2))
    for ax, metric in zip(axes, FIG2_METRICS):
        wide = per[metric].unstack("method").dropna()
        ax.scatter(wide[b], wide[a], s=30)
        for name, r in wide.iterrows():
            ax.annotate(name, (r[b], r[a]), fontsize=6, alpha=0.7)
        lo = float(min(wide.min().min(), 1.0)) - 0.02
        ax.plot([lo, 1], [lo, 1], "k--", lw=0.8)
        ax.set_xlim(lo, 1.005)
        ax.set_ylim(lo, 1.005)
        ax.set_xlabel(f"{b}")
        ax.set_ylabel(f"{a}")
        ax.set_title(f"{metric}: {(wide[a] > wide[b]).sum()}/{len(wide)} targets above the diagonal", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def umaps(views: dict[str, dict], path: Path, max_targets: int = 8) -> Path | None:
    """``views``: dataset -> {"coords": {"pca": (n, 2), "embedding": (n, 2)}, "labels": (n,)}."""
    views = dict(list(views.items())[:max_targets])
    if not views:
        return None
    plt = _plt()
    cols = ["pca", "embedding"]
    fig, axes = plt.subplots(len(views), 2, figsize=(10, 4.2 * len(views)), squeeze=False)
    for i, (name, v) in enumerate(views.items()):
        labels = np.asarray(v["labels"]).astype(str)
        kinds = sorted(set(labels))
        cmap = plt.get_cmap("tab20")
        for j, space in enumerate(cols):
            ax = axes[i, j]
            xy = v["coords"].get(space)
            if xy is None:
                ax.set_axis_off()
                continue
            for c, kind in enumerate(kinds):
                sel = labels == kind
                ax.scatter(xy[sel, 0], xy[sel, 1], s=3, color=cmap(c % 20), label=kind)
            ax.set_title(f"{name}: UMAP of {'PCA' if space == 'pca' else 'scPretrain embedding'}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 1].legend(fontsize=6, markerscale=3, loc="center left", bbox_to_anchor=(1, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def classifiers_on_features(main: pd.DataFrame, path: Path, metric: str = "kappa") -> Path | None:
    feat = main[main["method"].str.match(r"^(emb|pca)_")]
    if feat.empty:
        return None
    per = feat.groupby(["method", "dataset"])[metric].mean().groupby("method").agg(["mean", "std"])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    clfs = sorted({m.split("_", 1)[1] for m in per.index})
    x = np.arange(len(clfs))
    for off, space, label in ((-0.2, "emb", "scPretrain embedding"), (0.2, "pca", "PCA(200) of training cells")):
        means = [per["mean"].get(f"{space}_{c}", np.nan) for c in clfs]
        stds = [per["std"].get(f"{space}_{c}", np.nan) for c in clfs]
        ax.bar(x + off, means, 0.4, yerr=stds, label=label, capsize=3)
    ax.set_xticks(x)
    ax.set_xticklabels(clfs)
    ax.set_ylabel(f"{metric} (mean over targets)")
    ax.set_ylim(max(0.0, np.nanmin(per["mean"].to_numpy()) - 0.15), 1.0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def budget_curves(curve: pd.DataFrame, path: Path, metric: str = "kappa") -> Path | None:
    if curve.shape[1] < 2:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, r in curve.iterrows():
        ax.plot(curve.columns.astype(int), r.to_numpy(), marker="o", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("labelled training cells (budget)")
    ax.set_ylabel(f"{metric} (mean over targets and seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _file_stem(name: str) -> str:
    """``name`` as one file name: every character but letters, digits, ``.``, ``-`` and ``_``
    becomes ``_`` (type names such as ``Megakaryocyte/Platelet`` hold path separators)."""
    return re.sub(r"[^\w.-]", "_", name, flags=re.ASCII)


def confusion_matrix(dataset: str, table: dict[str, dict[str, int]], method: str, path: Path) -> Path | None:
    """True (rows) vs predicted (columns) cells, each row as fractions of its true type, counts
    in the cells."""
    if not table:
        return None
    true = list(table)
    pred = true + sorted({p for row in table.values() for p in row} - set(true))  # the diagonal first
    counts = np.array([[table[t].get(p, 0) for p in pred] for t in true], dtype=float)
    frac = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(pred), 1.0 + 0.45 * len(true)))
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(true)):
        for j in range(len(pred)):
            if counts[i, j]:
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                        color="white" if frac[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(pred)), pred, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(true)), true, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{dataset}: {method}, accuracy {np.trace(counts[:, :len(true)]) / max(counts.sum(), 1):.3f}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def transfer_heatmap(grid: pd.DataFrame, method: str, path: Path) -> Path:
    """Accuracy of each reference (rows) -> query (columns) pair, the values written in."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(2.5 + 0.9 * grid.shape[1], 1.5 + 0.5 * grid.shape[0]))
    im = ax.imshow(grid.to_numpy(dtype=float), cmap="viridis", vmin=0, vmax=1)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = grid.iat[i, j]
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(grid.shape[0]), [str(r) for r in grid.index], fontsize=7)
    ax.set_xlabel("query")
    ax.set_ylabel("reference")
    ax.set_title(f"{method}: accuracy, mean {np.nanmean(grid.to_numpy(dtype=float)):.3f}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_figures(rows: list[dict], views: dict, out_dir: Path, confusion: dict | None = None) -> list[str]:
    """The report's figures; ``confusion``: {target or query: {method: table}}, one confusion
    matrix figure per target/query (scPretrain's, first seed, full budget); a pairwise transfer
    adds one accuracy heat-map per method."""
    from scpretrain_dist.evaluate.report import budget_curve, main_rows, transfer_matrix

    out_dir = Path(out_dir)
    made = [umaps(views, out_dir / "fig3_umap_embedding_vs_pca.png")]
    if rows:
        main = main_rows(rows)
        made = [pretrained_vs_not(main, out_dir / "fig2_pretrained_vs_not.png"), made[0],
                classifiers_on_features(main, out_dir / "fig4_classifiers_embedding_vs_pca.png"),
                budget_curves(budget_curve(rows), out_dir / "fig5_kappa_vs_label_budget.png")]
    for method, grid in transfer_matrix(rows)[1].items():
        made.append(transfer_heatmap(grid, method, out_dir / f"transfer_matrix_{_file_stem(method)}.png"))
    for dataset, by_method in (confusion or {}).items():
        if "scpretrain" in by_method:
            made.append(confusion_matrix(dataset, by_method["scpretrain"], "scpretrain",
                                         out_dir / f"confusion_{_file_stem(dataset)}_scpretrain.png"))
    return [str(p) for p in made if p is not None]
