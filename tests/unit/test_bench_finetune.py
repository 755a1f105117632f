import json

import numpy as np
import torch


def test_finetune_runs_on_its_thread_setting_and_restores_the_process_threads(monkeypatch):
    from scpretrain_dist.config import FinetuneConfig, ModelConfig
    from scpretrain_dist.train import finetune as ft

    seen = []
    original = ft._finetune

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    rng = np.random.default_rng(0)
    X, y = rng.poisson(1.0, (60, 30)).astype(np.float32), rng.integers(0, 3, 60)
    monkeypatch.setattr(ft, "_finetune", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for threads in (1, 2, 8, 0):
            cfg = FinetuneConfig(max_epochs=1, threads=threads)
            ft.finetune(X[:50], y[:50], X[50:], y[50:], 3, cfg, ModelConfig(embedding_dim=8, hidden_dim=4), 0)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 2, 2, 2]  # capped at the setting (0: none), never above what the process had


def test_bench_finetune_reports_each_thread_count(tmp_path):
    from scpretrain_dist.cli import main

    out = tmp_path / "ft.json"
    code = main(["bench", "finetune", "--cells", "110", "--genes", "200", "--nonzeros", "20", "--epochs", "1",
                 "--threads", "1,2", "--busy", "0", "--repeats", "1", "--json", str(out)])
    res = json.loads(out.read_text())
    assert code in (0, None) and res["benchmark"] == "finetune" and set(res["seconds"]["idle"]) == {"1", "2"}
    assert res["ours"] > 0 and res["peers"]["2_threads"] > 0
