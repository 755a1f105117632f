"""The atlas store: TileDB-SOMA and zarr backends behind one protocol (``atlas.Atlas``), each
reached from a picklable locator."""

import os

# TileDB 2.30 (the one tiledbsoma 2.3 ships) orders a sparse read's tiles by a merge that runs in
# background tasks, and those can outlive the read: a test process crashed in one (a segfault in
# SparseGlobalOrderReader's tile-merge preprocessing after its read had returned; TileDB's
# CORE-241, fixed on TileDB's main branch after 2.30.1). Off in every process that imports the
# store, before its first TileDB context (TileDB reads TILEDB_* variables when it makes one); a
# user's value is kept.
os.environ.setdefault("TILEDB_SM_QUERY_SPARSE_GLOBAL_ORDER_PREPROCESS_TILE_MERGE", "0")

from scpretrain_dist.store.atlas import (
    Atlas,
    DatasetRecord,
    Locator,
    StoreError,
    atlas_for,
    open_atlas,
)

__all__ = ["Atlas", "DatasetRecord", "Locator", "StoreError", "atlas_for", "open_atlas"]
