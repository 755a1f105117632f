"""Catalog entries: name, path, species, tissue, technology, label column, value type."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path

import tomllib

from scpretrain_dist.catalog.values import VALUE_TYPES as STORED_VALUE_TYPES
from scpretrain_dist.config import UserError

VALUE_TYPES = ("auto", *STORED_VALUE_TYPES)
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


class CatalogError(UserError):
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
    gene_key: str = ""  # var column of gene symbols; empty: var_names
    # its genes are its own (anonymous, or another naming): accepted though it shares none with
    # the atlas (it still pretrains the encoder; nothing transfers through its genes)
    own_genes: bool = False
    # a mouse dataset's symbols are renamed to their human one-to-one orthologs through this table
    # ("builtin": Ensembl 105's, shipped with the package; a CSV path with human,mouse columns;
    # "none": upper-cased symbols only); other species ignore it
    orthologs: str = "builtin"
    # the entry itself names label_key, so the column must be there; otherwise a dataset without
    # it is ingested as unlabelled (said in the log)
    label_required: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("str", str) and not isinstance(value, str):
                raise CatalogError(f"dataset {self.name!r}: {f.name} = {value!r} must be a string")
            if f.type in ("bool", bool) and not isinstance(value, bool):
                raise CatalogError(f"dataset {self.name!r}: {f.name} = {value!r} must be true or false")
        if not _NAME.match(self.name) or len(self.name) > 200:
            raise CatalogError(
                f"dataset name {self.name!r} may only hold letters, digits, '_', '-' and '.' (not first), "
                "at most 200; rename the file, or list it in a catalog with a name of that form"
            )
        if not self.label_key:
            raise CatalogError(f"dataset {self.name}: label_key is empty; name the obs column of cell types")
        if self.value_type not in VALUE_TYPES:
            raise CatalogError(
                f"dataset {self.name}: value_type {self.value_type!r} must be one of {VALUE_TYPES}"
            )


def read_h5ad(path: str | Path, what: str, backed: str | None = None):
    """An ``.h5ad`` file as AnnData (``backed="r"``: X left on disk), or a CatalogError that says
    which input (``what``) is not a readable one and what to do."""
    import anndata as ad

    path = Path(path)
    if not path.exists():
        raise CatalogError(f"{what}: {path} does not exist")
    if not path.is_file():
        raise CatalogError(f"{what}: {path} is not a file (give an .h5ad file)")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head != b"\x89HDF\r\n\x1a\n":
        kind = "empty" if not head else "not an HDF5 file"
        raise CatalogError(f"{what}: {path} is {kind}, so not an .h5ad; give a file written by anndata "
                           "(AnnData.write_h5ad); for .loom, .csv or 10x folders convert with scanpy first")
    try:
        return ad.read_h5ad(path, backed=backed)
    except Exception as e:  # anndata and h5py raise many types for a broken or truncated file
        raise CatalogError(f"{what}: {path} is not a readable .h5ad file ({type(e).__name__}: {str(e)[:300]}); "
                           "check the file (truncated copy?) or write it again with anndata") from None


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
    for f in files:
        if f.suffix != ".h5ad":
            raise CatalogError(f"input {f} is not an .h5ad file (give .h5ad files, folders of them, or a catalog .toml)")
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
    where = f"catalog {path}"
    if path.is_dir():
        raise CatalogError(f"{where} is a folder; give the catalog's .toml file")
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise CatalogError(f"{where} does not exist") from None
    except UnicodeDecodeError:
        raise CatalogError(f"{where} is not a text file; a catalog is TOML (see data_catalog/README.md)") from None
    except tomllib.TOMLDecodeError as e:
        raise CatalogError(f"{where} is not valid TOML: {e}") from None
    keys = {f.name for f in fields(DatasetEntry)} - {"label_required"}
    unknown = sorted(set(data) - {"defaults", "dataset"})
    if unknown:
        raise CatalogError(f"{where}: unknown table(s) {unknown}; a catalog has [defaults] and [[dataset]] entries")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise CatalogError(f"{where}: defaults must be a table ([defaults])")
    bad = sorted(set(defaults) - keys - {"root"} | {"name", "path"} & set(defaults))
    if bad:
        raise CatalogError(f"{where}: [defaults] cannot set {bad}; it takes root and {', '.join(sorted(keys - {'name', 'path'}))}")
    if not isinstance(defaults.get("root", "."), str):
        raise CatalogError(f"{where}: [defaults] root must be a string (a folder)")
    base = Path(root) if root else (path.parent / defaults.get("root", ".")).resolve()
    if not base.is_dir():
        raise CatalogError(f"{where}: its datasets' folder {base} does not exist; "
                           + ("check --root" if root else "set [defaults] root, or pass --root"))
    rows = data.get("dataset", [])
    if not isinstance(rows, list) or not rows:
        raise CatalogError(f"{where} has no [[dataset]] entries")
    out = []
    for i, own in enumerate(rows):
        if not isinstance(own, dict):
            raise CatalogError(f"{where}: entry {i} is not a table; write each as a [[dataset]] entry")
        unknown = sorted(set(own) - keys)
        if unknown:
            raise CatalogError(f"{where}: entry {i} ({own.get('name', '?')}) has unknown key(s) {unknown}; "
                               f"valid keys: {', '.join(sorted(keys))}")
        row = {**{k: v for k, v in defaults.items() if k != "root"}, **own}
        if "name" not in row or "path" not in row:
            raise CatalogError(f"{where}: entry {i} needs both 'name' and 'path'")
        if not isinstance(row["path"], str) or not row["path"]:
            raise CatalogError(f"{where}: entry {i} ({row['name']}): path must be a non-empty string")
        p = Path(row["path"])
        row["path"] = str(p if p.is_absolute() or "://" in row["path"] else base / p)
        out.append(DatasetEntry(**row, label_required="label_key" in own))
    names = [e.name for e in out]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CatalogError(f"{where} names dataset(s) {repeated} more than once")
    return out
