"""scpretrain-dist: distributed scPretrain on a TileDB-SOMA atlas with Ray and MLflow.

Stages, in data-flow order: catalog -> store -> data -> pseudolabel -> model -> train ->
evaluate -> tracking -> serve.
"""

__version__ = "0.1.0"
