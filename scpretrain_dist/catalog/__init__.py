"""Dataset entries (what a dataset is and where it lives), read and checked before any store is touched."""

from scpretrain_dist.catalog.entries import (
    CatalogError,
    DatasetEntry,
    entries_from_paths,
    load_catalog,
)

__all__ = ["CatalogError", "DatasetEntry", "entries_from_paths", "load_catalog"]
