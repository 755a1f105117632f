"""A local Ray started from work dirs of any length, in a fresh process (its own Ray), as each
command of the pipeline starts one."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


# a work-dir length where <work-dir>/ray/session_.../sockets/... once passed the 107-byte limit
# (43-56 characters). Ray's folder no longer depends on the work dir's length (swept from 20 to
# 120 characters in tests/unit/test_runtime.py), so one length stands for all; the quickstart in
# test_quickstart.py runs the full pipeline from a 120-character work dir.
@pytest.mark.parametrize("length", [46])
def test_a_local_ray_starts_and_runs_a_task_from_a_work_dir_of_any_length(length):
    """What the quickstart's Ray commands do first, in a fresh process (its own local Ray)."""
    # in the run's shared folder (short, and removed at the end with the Ray folder the work dir
    # links to: tests/conftest.py)
    base = Path(tempfile.mkdtemp(dir=os.environ["SCPRETRAIN_TEST_RUN_DIR"]))
    stem = str(base / "wörk ")
    work = stem + "x" * (length - len(stem))
    if len(work) != length:
        pytest.skip(f"no work dir of {length} characters can be made here")
    code = ("import ray, sys\nfrom scpretrain_dist import recipes\nfrom scpretrain_dist.runtime import init_ray\n"
            "init_ray(recipes.configure('tiny', work_dir=sys.argv[1], ray={'num_cpus': 2}))\n"
            "print(ray.get(ray.remote(lambda: 'ran').remote()))\nray.shutdown()\n")
    proc = subprocess.run([sys.executable, "-c", code, work], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ran"), proc.stderr[-3000:]
    assert (Path(work) / "ray").is_symlink()
