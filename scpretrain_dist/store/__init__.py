"""The atlas store: a TileDB-SOMA experiment behind a picklable locator."""

from scpretrain_dist.store.soma import AtlasLocator, AtlasStore, DatasetRecord, StoreError

__all__ = ["AtlasLocator", "AtlasStore", "DatasetRecord", "StoreError"]
