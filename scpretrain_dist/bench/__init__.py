"""Benchmarks (``scpretrain bench NAME``): ours vs peers measured in the same run, printed and
written as JSON. Each benchmark module has ``add_arguments(parser)`` and ``run(args) -> dict``."""

BENCHMARKS = ("loader", "kmeans", "pretrain", "annotate", "scale", "gpu", "orthologs", "finetune")
