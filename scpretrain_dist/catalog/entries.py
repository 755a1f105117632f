"""Catalog entries: name, path, species, tissue, technology, label column, value type."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import tomllib

VALUE_TYPES = ("auto", "counts", "lognorm", "log2norm")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class CatalogError(ValueError):
    """A catalog file or entry that cannot be used."""


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    path: str
    species: str = "unknown"
    tissue: str = "unknown"
    technology: str = "unknown"
    label_key: str = "cell_type"
    value_type: str = "auto"
    group: str = ""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise CatalogError(
                f"dataset name {self.name!r} may only hold letters, digits, '_', '-' and '.'"
            )
        if self.value_type not in VALUE_TYPES:
            raise CatalogError(
                f"dataset {self.name}: value_type {self.value_type!r} must be one of {VALUE_TYPES}"
            )


def entries_from_paths(paths: list[str | Path]) -> list[DatasetEntry]:
    """One entry per ``.h5ad`` file; a folder contributes every ``.h5ad`` inside it, sorted."""
    files: list[Path] = []
    listed: list[DatasetEntry] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.h5ad"))
            if not found:
                raise CatalogError(f"folder {p} holds no .h5ad files")
            files.extend(found)
        elif p.suffix == ".toml":
            listed.extend(load_catalog(p))
        elif p.exists():
            files.append(p)
        else:
            raise CatalogError(f"input {p} does not exist")
    entries = listed + [DatasetEntry(name=f.stem, path=str(f)) for f in files]
    seen: dict[str, str] = {}
    for e in entries:
        if e.name in seen:
            raise CatalogError(f"two inputs give the dataset name {e.name!r}: {seen[e.name]} and {e.path}")
        seen[e.name] = e.path
    return entries


def load_catalog(path: str | Path, root: str | Path | None = None) -> list[DatasetEntry]:
    """Read a TOML catalog (see ``data_catalog/``). Paths are relative to ``root``, which
    defaults to the catalog's ``[defaults] root`` resolved against the catalog's folder."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise CatalogError(f"catalog {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise CatalogError(f"catalog {path} is not valid TOML: {e}") from None
    defaults = data.get("defaults", {})
    base = Path(root) if root else (path.parent / defaults.get("root", ".")).resolve()
    rows = data.get("dataset", [])
    if not rows:
        raise CatalogError(f"catalog {path} has no [[dataset]] entries")
    out = []
    for i, row in enumerate(rows):
        row = {**{k: v for k, v in defaults.items() if k != "root"}, **row}
        if "name" not in row or "path" not in row:
            raise CatalogError(f"catalog {path}: entry {i} needs both 'name' and 'path'")
        p = Path(row["path"])
        row["path"] = str(p if p.is_absolute() or "://" in row["path"] else base / p)
        try:
            out.append(DatasetEntry(**row))
        except TypeError as e:
            raise CatalogError(f"catalog {path}: entry {row.get('name')}: {e}") from None
    return out
