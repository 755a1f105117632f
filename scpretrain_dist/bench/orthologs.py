"""Gene overlap of mouse datasets with human ones: upper-cased symbols vs one-to-one orthologs.

Every dataset of ``--catalog`` is read as ingest reads it (``prepare_dataset``), the mouse ones
twice: with ``orthologs = "none"`` (upper-cased symbols, the matching before the table) and with
the entry's table (default the built-in Ensembl 105 one). For each mouse dataset: its genes, how
many of them the human datasets of the catalog measure (the genes the atlas can transfer
between the species) under each matching, and the gain.
"""

from __future__ import annotations

import dataclasses

from scpretrain_dist.bench.report import result
from scpretrain_dist.config import ConfigError


def add_arguments(p) -> None:
    p.add_argument("--catalog", help="catalog TOML with species per dataset (e.g. data_catalog/scrna_shared.toml)")
    p.add_argument("--root", help="folder the catalog's paths are relative to")


def run(args) -> dict:
    from scpretrain_dist.catalog.entries import load_catalog
    from scpretrain_dist.catalog.inputs import prepare_dataset
    from scpretrain_dist.catalog.orthologs import is_mouse

    if not args.catalog:
        raise ConfigError("bench orthologs needs --catalog (and --root where its paths are relative)")
    entries = load_catalog(args.catalog, args.root)
    quiet = lambda *a, **k: None  # noqa: E731
    human = set()
    for e in entries:
        if e.species.lower() == "human":
            human |= set(prepare_dataset(e, log=quiet).symbols)
    rows = {}
    for e in entries:
        if not is_mouse(e.species):
            continue
        plain = prepare_dataset(dataclasses.replace(e, orthologs="none"), log=quiet)
        mapped = prepare_dataset(e, log=quiet)
        a, b = len(set(plain.symbols) & human), len(set(mapped.symbols) & human)
        rows[e.name] = {"genes": len(plain.symbols), "shared_upper_case": a, "shared_orthologs": b, "gained": b - a,
                        "renamed": len(set(mapped.symbols) - set(plain.symbols)), "genes_after": len(mapped.symbols)}
        print(f"bench orthologs: {e.name}: {rows[e.name]}")
    if not rows:
        raise ConfigError(f"the catalog {args.catalog} has no dataset with species mouse")
    total_a = sum(r["shared_upper_case"] for r in rows.values())
    total_b = sum(r["shared_orthologs"] for r in rows.values())
    return result("orthologs", "genes shared with the human datasets (sum over mouse datasets)", total_b,
                  {"upper_case": total_a}, higher_is_better=True, human_genes=len(human), datasets=rows,
                  ours_is="mouse symbols renamed to their one-to-one human orthologs (catalog orthologs)",
                  peer_is="upper-cased symbols")
