"""Gene-space alignment, normalisation, DDP-safe sharding and the training dataset."""
