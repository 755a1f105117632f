"""Ray's temporary folder: short whatever the work dir's path, so its sockets always fit; and
how a command's process ends."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import subprocess
import sys

import pytest

from scpretrain_dist.runtime import _SOCKET_PATH_MAX, _SOCKET_TAIL, ray_temp_dir


def _work_dir(root, length: int) -> str:
    """An absolute work dir of exactly ``length`` characters under ``root``, with a space and a
    non-ASCII letter in it."""
    stem = str(root / "wörk dir ")
    assert len(stem) < length or length < 20
    return stem + "x" * max(0, length - len(stem))


@pytest.mark.parametrize("length", range(20, 121))
def test_sockets_fit_for_every_work_dir_length(tmp_path_factory, length):
    root = tmp_path_factory.getbasetemp() / "w"
    root.mkdir(exist_ok=True)
    outside = len(str(root / "wörk dir ")) >= length
    if outside:
        root = type(root)("/tmp/w")  # the shortest lengths: a work dir near the file system's root
        root.mkdir(exist_ok=True)
    work = _work_dir(root, length)
    if len(work) != length:
        pytest.skip(f"no work dir of {length} characters can be made here")
    try:
        temp = ray_temp_dir(work)
        # the longest socket Ray makes under it stays within the limit, and the same work dir
        # always gets the same folder (so its sessions and logs are found again)
        assert len(os.fsencode(temp)) + _SOCKET_TAIL <= _SOCKET_PATH_MAX
        assert ray_temp_dir(work) == temp
        link = os.path.join(work, "ray")
        assert os.path.islink(link) and os.path.realpath(link) == str(temp.resolve())
        assert temp.stat().st_mode & 0o777 == 0o700
        temp.rmdir()  # empty: no Ray ran in it
    finally:  # what was made outside pytest's temp folder goes (another run may share /tmp/w)
        if outside:
            shutil.rmtree(work, ignore_errors=True)
            with contextlib.suppress(OSError):
                root.rmdir()


def test_different_work_dirs_get_different_folders(tmp_path):
    a, b = ray_temp_dir(tmp_path / "a"), ray_temp_dir(tmp_path / "b")
    assert a != b
    a.rmdir(), b.rmdir()


def test_an_existing_ray_folder_of_an_older_run_is_left_alone(tmp_path):
    old = tmp_path / "ray"
    old.mkdir()
    (old / "session_latest").write_text("old logs")
    ray_temp_dir(tmp_path).rmdir()
    assert old.is_dir() and not old.is_symlink() and (old / "session_latest").read_text() == "old logs"


def test_a_command_exits_without_a_last_collection_after_every_other_exit_handler():
    """The ``scpretrain`` program (``cli.run``) freezes every object out of the garbage collector's
    last passes only once the exit handlers registered after it (Ray's, MLflow's, temporary
    folders') have run with the collector as usual."""
    assert importlib.metadata.entry_points(group="console_scripts")["scpretrain"].value == "scpretrain_dist.cli:run"
    code = ("import atexit, gc\n"
            "atexit.register(lambda: print('after it', gc.get_freeze_count() > 0))\n"
            "from scpretrain_dist.console import exit_without_final_collection\n"
            "exit_without_final_collection()\n"
            "atexit.register(lambda: print('before it', gc.get_freeze_count() > 0))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["before it False", "after it True"]
