"""The shape every benchmark reports in."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path


def result(name: str, unit: str, ours: float, peers: dict[str, float], higher_is_better: bool = True,
           **extra) -> dict:
    """``{"benchmark", "unit", "ours", "peers", "ratios", ...}``; each ratio is > 1 when we are
    better (ours/peer for rates, peer/ours for times and sizes)."""
    ratios = {}
    for peer, y in peers.items():
        if y is None or ours is None or y == 0 or ours == 0:
            ratios[peer] = None
        else:
            ratios[peer] = ours / y if higher_is_better else y / ours
    return {"benchmark": name, "unit": unit, "ours": ours, "peers": peers, "ratios": ratios,
            "higher_is_better": higher_is_better, "machine": machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **extra}


def machine() -> dict:
    import os

    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()}


def emit(res: dict, json_path: str | None) -> None:
    """Print a human-readable summary and write the JSON file if asked."""
    print(f"\n== bench {res['benchmark']} ({res['unit']}, {'higher' if res['higher_is_better'] else 'lower'} is better)")
    print(f"  ours: {_fmt(res['ours'])}")
    for peer, y in res["peers"].items():
        r = res["ratios"].get(peer)
        print(f"  {peer}: {_fmt(y)}   {_ratio_words(r, peer)}")
    for k, v in res.items():
        if k not in {"benchmark", "unit", "ours", "peers", "ratios", "higher_is_better", "machine", "when"}:
            print(f"  {k}: {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(res, indent=1, default=str))
        print(f"  wrote {json_path}")


def _ratio_words(r: float | None, peer: str) -> str:
    """How the ratio reads: ours ahead (ratio >= 1), or the peer ahead, by its own factor."""
    if r is None:
        return "ratio n/a"
    if r >= 1:
        return f"ours {r:.2f}x better"
    return f"{peer} {1 / r:.2f}x better (ratio {r:.2f}x)"


def _fmt(x) -> str:
    return "n/a" if x is None else (f"{x:,.1f}" if isinstance(x, (int, float)) else str(x))
