"""The MLflow Model Registry: registering a model with its alias and lineage, resolving a
``models:/`` URI to the version it names, fetching a version's files, and listing versions."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from scpretrain_dist.config import UserError
from scpretrain_dist.console import detail, exit_without_final_collection


class RegistryError(UserError):
    """A model URI, registry or model version that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class ModelRef:
    """A registered model version, resolved once so every actor loads the same one."""

    name: str
    version: int
    run_id: str
    tracking_uri: str
    requested: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def prefix(self) -> str:
        """Stem of the obs columns and the embedding array of this model version."""
        return f"scpretrain__{re.sub(r'[^A-Za-z0-9_]', '_', self.name)}__v{self.version}"

    @property
    def label_column(self) -> str:
        return self.prefix + "__label"

    @property
    def confidence_column(self) -> str:
        return self.prefix + "__confidence"


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def resolve_model(uri: str, tracking_uri: str) -> ModelRef:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> the version it names today."""
    from mlflow.exceptions import MlflowException

    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/@]+)|/(\d+))", uri or "")
    if not m:
        raise RegistryError(
            f"--model {uri!r} must look like models:/NAME@ALIAS or models:/NAME/VERSION "
            "(`scpretrain models list` shows the registered ones)"
        )
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).exists():
        raise RegistryError(
            f"no MLflow store at {tracking_uri}; pass the --work-dir the model was fine-tuned in "
            "(or set tracking.tracking_uri)"
        )
    name, alias, version = m.groups()
    client = _client(tracking_uri)
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException:
        try:
            known = [f"models:/{rm.name} (aliases: {', '.join(sorted(rm.aliases)) or 'none'})"
                     for rm in client.search_registered_models()]
        except MlflowException:
            known = []
        raise RegistryError(
            f"model {uri} is not in the registry at {tracking_uri}; registered: {'; '.join(known) or 'nothing'}. "
            "List them with `scpretrain models list`"
        ) from None
    return ModelRef(name, int(mv.version), mv.run_id or "", tracking_uri, uri)


def download_pyfunc_artifacts(ref: ModelRef, dst: str | Path) -> dict[str, Path]:
    """The version's pyfunc artifacts (name -> local path), downloaded into ``dst``."""
    import mlflow
    from mlflow.models import Model

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # models:/ URIs resolve through the global registry URI (a tracking_uri argument is not enough)
    mlflow.set_tracking_uri(ref.tracking_uri)
    mlflow.set_registry_uri(ref.tracking_uri)
    path = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=str(dst)))
    arts = (Model.load(str(path)).flavors.get("python_function") or {}).get("artifacts") or {}
    return {k: path / v["path"] for k, v in arts.items()}


def _fetch(uri: str, tracking_uri: str, dst: str, quiet: bool) -> tuple[ModelRef, dict[str, Path]]:
    """:func:`resolve_model`, then :func:`download_pyfunc_artifacts` into ``dst``."""
    if quiet:  # a helper process: MLflow's records and warnings stay off the console, as in a command
        import logging
        import warnings

        logging.getLogger("mlflow").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module="mlflow")
    ref = resolve_model(uri, tracking_uri)
    return ref, download_pyfunc_artifacts(ref, dst)


class ModelFetch:
    """A registered model version resolved and its pyfunc artifacts downloaded into a temporary
    folder (removed with this object). Where this process has not imported MLflow yet (a
    command's first seconds), both run in a helper process that starts at once, so MLflow's
    import and store set-up (about 2.5 s of one core) overlap the caller's own start-up (torch,
    the input file) instead of preceding it. :meth:`result` waits for them and raises what the
    registry refused (:class:`RegistryError`)."""

    def __init__(self, uri: str, tracking_uri: str):
        from scpretrain_dist.console import verbose

        self.requested, self._tracking_uri = uri, tracking_uri
        self._dir = tempfile.TemporaryDirectory(prefix="scp-model-")
        self._done: tuple[ModelRef, dict[str, Path]] | None = None
        self._pool = self._future = None
        if "mlflow" not in sys.modules:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            try:
                self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=exit_without_final_collection)
                self._future = self._pool.submit(_fetch, uri, tracking_uri, self._dir.name, not verbose())
                detail(f"fetching {uri} from {tracking_uri} in a helper process")
            except OSError as e:  # no process to start here (no /dev/shm, a process limit): fetched in this one
                detail(f"no helper process for the model ({e}); fetching it in this process")
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool = self._future = None

    def result(self) -> tuple[ModelRef, dict[str, Path]]:
        """The version and its artifacts (name -> local path)."""
        if self._done is None and self._future is not None:
            from concurrent.futures.process import BrokenProcessPool

            try:
                self._done = self._future.result()
            except BrokenProcessPool as e:  # the helper died (killed, out of memory): once more here
                detail(f"the model's helper process died ({e}); fetching it in this process")
            finally:  # the helper's exit is not waited for: the result is here, and it ends by itself
                self._pool.shutdown(wait=False)
                self._pool = self._future = None
        if self._done is None:
            self._done = _fetch(self.requested, self._tracking_uri, self._dir.name, False)
        return self._done

    @property
    def ref(self) -> ModelRef:
        return self.result()[0]

    def close(self) -> None:
        """Stop the helper (when its result was never asked for) and remove the folder; the
        result stays."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._dir.cleanup()

    def __enter__(self) -> ModelFetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def log_pyfunc_model(python_model, artifacts: dict[str, str], signature, example, code_paths: list[str],
                     pip_requirements: list[str], lineage: dict, registered_model: str, alias: str) -> tuple[str, int]:
    """Log a pyfunc model in the active run, register it, point ``alias`` at the new version and
    tag the version with its ``lineage``. Returns (model name, version). What MLflow prints and
    warns on the way (its advice on type hints and pickling, "registered model ...") goes to the
    log file."""
    import contextlib
    import io
    import warnings

    import mlflow

    said = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stderr(said):
        warnings.simplefilter("always")
        info = mlflow.pyfunc.log_model(name="annotator", python_model=python_model, artifacts=artifacts,
                                       code_paths=code_paths, signature=signature, input_example=example,
                                       pip_requirements=pip_requirements)
        version = mlflow.register_model(info.model_uri, registered_model)
    for line in [*(str(w.message) for w in caught), *said.getvalue().splitlines()]:
        if line.strip():
            detail(f"mlflow: {line.strip()}")
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(registered_model, alias, version.version)
    for k, v in lineage.items():
        client.set_model_version_tag(registered_model, version.version, k, v if isinstance(v, str) else json.dumps(v))
    return registered_model, int(version.version)


_LINEAGE_SHOWN = {"finetune_dataset", "metrics", "pretrain_datasets", "store_uri", "store_version", "encoder_run",
                  "pseudo_label_version"}


def describe_models(tracking_uri: str) -> list[str]:
    """Every registered version with its aliases, lineage, signature and input example, as lines."""
    import mlflow

    client = _client(tracking_uri)
    models = client.search_registered_models()
    if not models:
        return [f"no registered models in {tracking_uri}"]
    lines = []
    for rm in models:
        aliases = getattr(rm, "aliases", {}) or {}
        for v in sorted(client.search_model_versions(f"name='{rm.name}'"), key=lambda v: int(v.version)):
            tags = dict(v.tags)
            al = [a for a, ver in aliases.items() if str(ver) == str(v.version)]
            lines.append(f"models:/{rm.name}/{v.version}  aliases={al}  fine-tuned on "
                         f"{tags.get('finetune_dataset', '?')}  metrics={tags.get('metrics', '{}')}")
            lines.append(f"    pretrained on {tags.get('pretrain_datasets', '?')}; store "
                         f"{tags.get('store_uri', '?')}@{tags.get('store_version', '?')}")
            lines.append(f"    encoder run {tags.get('encoder_run') or '-'}; pseudo-labels "
                         f"v{tags.get('pseudo_label_version', '?')}; fine-tune run {v.run_id}")
            try:
                info = mlflow.models.get_model_info(f"models:/{rm.name}/{v.version}")
                lines.append(f"    signature: {'yes' if info.signature else 'NO'}; input example: "
                             f"{'yes' if info.saved_input_example_info else 'NO'}")
            except Exception as e:  # an unreadable artifact store should not hide the other versions
                lines.append(f"    model files unreadable: {type(e).__name__}: {e}")
            rest = {k: tags[k] for k in sorted(tags) if k not in _LINEAGE_SHOWN}
            if rest:
                lines.append("    " + "; ".join(f"{k}={val}" for k, val in rest.items()))
    return lines
