"""``bench gpu`` end to end on the CPU (``--device cpu``): every section runs and reports."""

from __future__ import annotations

import json

import numpy as np

from scpretrain_dist.cli import main


def test_bench_gpu_dry_run_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    rc = main(["bench", "gpu", "--device", "cpu", "--cells", "3000", "--datasets", "3", "--genes", "600",
               "--types", "4", "--epochs", "1", "--processes", "1", "--peer-cells", "1500",
               "--large-batch", "0", "--json", str(out)])
    assert rc in (0, None)
    res = json.loads(out.read_text())
    assert res["benchmark"] == "gpu" and res["ours"] > 0
    assert set(res["peers"]) == {"plain_pytorch", "plain_device_batches"}
    assert res["atlas"]["cells"] == 3000
    for key in ("refresh_random_encoder", "refresh_trained_encoder"):
        assert 0 <= res[key]["nmi"] <= 1 and res[key]["lloyd_seconds"] > 0
    # both plain variants train the same network on the same batches: the same losses
    assert res["pretrain_plain_pytorch"]["epoch_loss"] == res["pretrain_plain_device_batches"]["epoch_loss"]
    assert np.isfinite(res["pretrain_ours"]["final_eval_loss"])
    proj = res["projection"]
    assert proj["ours_total_hours"] > 0 and proj["refresh_scaled_from_cells"] == 3000


def test_bench_gpu_without_a_gpu_says_what_to_do(tmp_path, capsys):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "gpu.json"
    rc = main(["bench", "gpu", "--cells", "3000", "--datasets", "3", "--json", str(out)])
    assert rc not in (0, None)
    assert "--device cpu" in capsys.readouterr().err
    assert not out.exists()


def test_plain_loop_of_the_original_design_learns(demo_store, tmp_path):
    """``bench pretrain``'s peer (the network ``bench gpu`` shares): dense batches of one
    dataset each; on learnable labels (the cell types) its loss falls."""
    from scpretrain_dist.bench.pretrain import plain_loop
    from scpretrain_dist.pseudolabel.pool import PseudoLabels

    records = demo_store.datasets()
    names = [r.name for r in records]
    types = {d: np.unique(demo_store.read_obs(d)["cell_type"].astype(str), return_inverse=True)[1] for d in names}
    labels = PseudoLabels(0, {d: np.stack([t, t], 1).astype(np.int64) for d, t in types.items()},
                          {d: [int(t.max()) + 1] * 2 for d, t in types.items()}, "expression")
    path = labels.save(tmp_path / "labels.npz")
    res = plain_loop(demo_store.uri, names, str(path), {"seed": 0, "lr": 1e-2, "batch_size": 16, "epochs": 4}, dim=16)
    assert res["epoch_loss"][-1] < res["epoch_loss"][0]
    assert res["final_eval_loss"] < res["epoch_loss"][0]
    assert res["cells_per_second_per_worker"] > 0
