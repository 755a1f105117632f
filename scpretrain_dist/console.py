"""What a command shows and what it keeps: a short console (what each stage did, progress bars,
the summary, warnings) and the full log, every detail included, in a file under the work dir
(``<work-dir>/logs/<command>-<time>.log``, its path printed at the end). ``--verbose`` shows the
details and the frameworks' own messages on the console too."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

SAY = 25  # between INFO (details) and WARNING: what the console shows
logging.addLevelName(SAY, "SAY")
_LOG = logging.getLogger("scpretrain")
_LOG.setLevel(logging.DEBUG)
# the frameworks' chatter (Ray's start-up and token notices, MLflow's database set-up, pickling
# notes, type-hint advice): into the log file, on the console only with --verbose
_QUIET = ("ray", "mlflow", "alembic", "urllib3", "filelock", "numba", "celltypist")


def detail(message: str) -> None:
    """A line for the log file (and the console with --verbose)."""
    _LOG.info(message)


def say(message: str) -> None:
    """A line for the console and the log file."""
    _LOG.log(SAY, message)


class _WorkDirFile(logging.Handler):
    """Writes to ``<work_dir>/logs/<name>``, opened once the work dir exists (a command refused
    before it made anything leaves no log behind); until then records wait in memory."""

    def __init__(self, work_dir: str | Path, name: str):
        super().__init__(logging.DEBUG)
        self.work_dir, self.name = Path(work_dir), name
        self.path: Path | None = None
        self._stream = None
        self._held: list[str] = []
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # a record that cannot be formatted is not worth a crash
            return
        if self._stream is None and self.work_dir.is_dir():
            self.path = self.work_dir / "logs" / self.name
            self.path.parent.mkdir(exist_ok=True)
            self._stream = open(self.path, "a", encoding="utf-8")
            for held in self._held:
                self._stream.write(held + "\n")
            self._held = []
        if self._stream is None:
            self._held.append(line)
        else:
            self._stream.write(line + "\n")
            self._stream.flush()

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        super().close()


class Session:
    """The console and log file of one command; :func:`start` makes it, :func:`finish` ends it."""

    def __init__(self, command: str, verbose: bool):
        self.command, self.verbose = command, verbose
        self.file: _WorkDirFile | None = None
        self.console = logging.StreamHandler(sys.stdout)
        self.console.setLevel(logging.INFO if verbose else SAY)
        self.console.setFormatter(logging.Formatter("%(message)s"))
        self.console.addFilter(lambda r: r.name == "scpretrain" or r.name.startswith("scpretrain.") or verbose)
        self._saved_levels = {name: logging.getLogger(name).level for name in _QUIET}
        root = logging.getLogger()
        self._root_level = root.level
        root.setLevel(logging.DEBUG if verbose else logging.INFO)
        root.addHandler(self.console)
        self.quiet_libraries()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        if not verbose:
            warnings.filterwarnings("ignore", module="mlflow")
            warnings.filterwarnings("ignore", category=UserWarning, message=".*type hint.*")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        if not verbose:  # MLflow's records then go through ours (to the file), not its own handler
            os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")

    def quiet_libraries(self) -> None:
        """Libraries' own records: errors only on the console (all of them with --verbose)."""
        for name in _QUIET:
            logging.getLogger(name).setLevel(logging.DEBUG if self.verbose else logging.ERROR)

    def log_to(self, work_dir: str | Path) -> None:
        """Keep the full log under ``work_dir`` (once it exists)."""
        if self.file is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.file = _WorkDirFile(work_dir, f"{self.command}-{stamp}-{os.getpid()}.log")
            logging.getLogger().addHandler(self.file)

    def close(self) -> Path | None:
        root = logging.getLogger()
        root.removeHandler(self.console)
        root.setLevel(self._root_level)
        path = None
        if self.file is not None:
            root.removeHandler(self.file)
            path = self.file.path
            self.file.close()
        for name, level in self._saved_levels.items():
            logging.getLogger(name).setLevel(level)
        self._warnings.__exit__(None, None, None)
        return path


_SESSION: Session | None = None


def start(command: str, verbose: bool) -> Session:
    global _SESSION
    _SESSION = Session(command, verbose)
    return _SESSION


def log_to(work_dir: str | Path) -> None:
    if _SESSION is not None:
        _SESSION.log_to(work_dir)


def quiet_libraries() -> None:
    """Again, after importing a library that sets its loggers' levels itself (Ray does)."""
    if _SESSION is not None:
        _SESSION.quiet_libraries()


def verbose() -> bool:
    return bool(_SESSION and _SESSION.verbose)


def finish() -> Path | None:
    """End the session; the log file's path, if one was written."""
    global _SESSION
    path = _SESSION.close() if _SESSION is not None else None
    _SESSION = None
    return path


def progress(total: int | None, desc: str, unit: str = "it", initial: int = 0):
    """A tqdm bar on the console (stderr), the one per long stage."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, smoothing=0.1,
                leave=True, file=sys.stderr, disable=False)


def exit_without_final_collection() -> None:
    """Let this process end without the garbage collector's last passes over every object it
    holds: Python's shutdown otherwise spends half a second of a core on the modules a command
    imported (torch, numba, MLflow), after all its work is done. Registered first, so it runs
    after every other exit handler (Ray's, MLflow's, temporary folders'); objects are still
    released one by one, and files closed, as at any exit."""
    import atexit
    import gc

    atexit.register(gc.freeze)
