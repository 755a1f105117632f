"""``bench scale``'s measuring (peak RSS of a whole process tree, a memory cap), the synthetic
atlas's read depth, and the refusals of bad sizes before any atlas is built."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from scpretrain_dist.bench.scale import measured
from scpretrain_dist.cli import main
from scpretrain_dist.config import ConfigError, DemoDataConfig

HOLD = "import numpy as np, time; a = np.ones({mib} << 17); time.sleep(1.0); print(a.sum())"


def test_peak_rss_counts_the_processes_a_step_starts(tmp_path):
    # the parent holds 50 MiB and starts a child holding 300 MiB: the tree's peak is their sum
    child = HOLD.format(mib=300)
    parent = (f"import subprocess, sys, numpy as np; a = np.ones(50 << 17); "
              f"subprocess.run([sys.executable, '-c', {child!r}], check=True); print(a.sum())")
    r = measured([sys.executable, "-c", parent], tmp_path / "tree.log")
    assert r["rc"] == 0 and r["stdout"].split() == [str(float(300 << 17)), str(float(50 << 17))]
    assert r["tree_peak_rss_mib"] > 340


def test_a_child_reports_its_own_peak_not_its_parents(tmp_path):
    # Linux carries ru_maxrss across exec: a small child of a 600 MiB parent would report 600
    code = "from scpretrain_dist.runtime import peak_rss_mib; print(peak_rss_mib())"
    parent = (f"import subprocess, sys, numpy as np; a = np.ones(600 << 17); "
              f"print(subprocess.run([sys.executable, '-c', {code!r}], capture_output=True, text=True).stdout)")
    r = measured([sys.executable, "-c", parent], tmp_path / "own.log")
    assert r["rc"] == 0 and float(r["stdout"].split()[0]) < 300


def test_a_step_over_the_memory_cap_fails_instead_of_the_machine(tmp_path):
    r = measured([sys.executable, "-c", HOLD.format(mib=2048)], tmp_path / "cap.log", cap_bytes=1 << 30)
    assert r["rc"] != 0 and "MemoryError" in (tmp_path / "cap.log").read_text()
    ok = measured([sys.executable, "-c", HOLD.format(mib=100)], tmp_path / "ok.log", cap_bytes=1 << 30)
    assert ok["rc"] == 0


def test_read_depth_sets_the_genes_per_cell():
    from scpretrain_dist import demo

    def genes_per_cell(lo, hi):
        plan = demo.plan_atlas(DemoDataConfig(n_datasets=2, n_genes=20000, n_cells=8000, min_reads=lo, max_reads=hi))
        _, X = demo.simulate_chunk(plan, demo.dataset_model(plan, 0), 0)
        return np.diff(X.indptr)

    shallow, deep = genes_per_cell(500, 3000), genes_per_cell(2000, 4000)
    assert np.median(deep) > 1.3 * np.median(shallow) and np.percentile(deep, 1) > 500
    with pytest.raises(ConfigError, match="demo.min_reads = 10 is above demo.max_reads = 5"):
        DemoDataConfig(min_reads=10, max_reads=5)


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "1000", "--celltypist-sizes", "5000"], "above the largest atlas"),
    (["--sizes", "1e6"], "comma-separated cell counts"),
    (["--parts", "ingest,speed"], "--parts takes"),
])
def test_bad_sizes_are_refused_before_any_atlas_is_built(tmp_path, capsys, argv, message):
    rc = main(["bench", "scale", "--work-dir", str(tmp_path / "w"), "--parts", "ingest", *argv])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
