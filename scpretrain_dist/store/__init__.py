"""The atlas store: TileDB-SOMA and zarr backends behind one protocol (``atlas.Atlas``), each
reached from a picklable locator."""

from scpretrain_dist.store.atlas import (
    Atlas,
    DatasetRecord,
    Locator,
    StoreError,
    atlas_for,
    open_atlas,
)

__all__ = ["Atlas", "DatasetRecord", "Locator", "StoreError", "atlas_for", "open_atlas"]
