"""Mouse gene symbols as their human one-to-one orthologs.

The atlas matches genes by upper-cased symbol. That pairs most mouse genes with their human
orthologs (Cd3e and CD3E), misses the ones named differently (Trp53inp2 and TP53INP2, mt-Cytb
and MT-CYB) and pairs a few with the wrong human gene (mouse Cxcl5's ortholog is CXCL6, not
CXCL5). An ortholog table fixes both: each mouse symbol it lists takes its human ortholog's
name, a mouse symbol whose upper-cased form is a human gene the table gives to another mouse
gene is dropped (it is not that gene's ortholog), and every other symbol keeps its upper-cased
form. The built-in table holds the Ensembl 105 one-to-one pairs whose names differ beyond case
(``human_mouse_orthologs.csv``); a user's table is a CSV with ``human`` and ``mouse`` columns
(only its one-to-one pairs are used).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

BUILTIN = "builtin"
BUILTIN_TABLE = Path(__file__).with_name("human_mouse_orthologs.csv")
MOUSE = ("mouse", "mus musculus", "mus_musculus", "mm10", "mm39", "grcm38", "grcm39")


class OrthologError(ValueError):
    """An ortholog table that cannot be read; the message names the file and the fix."""


def is_mouse(species: str) -> bool:
    return str(species).strip().lower() in MOUSE


@dataclass(frozen=True)
class Orthologs:
    """Upper-cased mouse symbol -> human symbol, for the pairs whose names differ beyond case."""

    mouse_to_human: dict[str, str]
    source: str

    @property
    def human(self) -> frozenset[str]:
        return frozenset(self.mouse_to_human.values())

    @property
    def human_to_mouse(self) -> dict[str, str]:
        return {h: m for m, h in self.mouse_to_human.items()}

    def looks_mouse(self, symbols) -> bool:
        """Whether upper-cased ``symbols`` name mouse genes rather than their human orthologs:
        more of them are mouse names of the table than human names (a mouse dataset may already
        carry human-homolog symbols, which must not be renamed again)."""
        mouse, human = self.name_hits(symbols)
        return mouse > human

    def name_hits(self, symbols) -> tuple[int, int]:
        """How many of ``symbols`` are mouse names of the table, and how many human names."""
        upper = {str(s).upper() for s in symbols}
        return len(upper & self.mouse_to_human.keys()), len(upper & self.human)

    def to_human(self, symbols) -> np.ndarray:
        """Upper-cased mouse ``symbols`` as human ones; None where a symbol is dropped."""
        human = self.human
        out = []
        for s in symbols:
            s = str(s).upper()
            if s in self.mouse_to_human:
                out.append(self.mouse_to_human[s])
            else:
                out.append(None if s in human else s)
        return np.array(out, dtype=object)


def load_orthologs(source: str = BUILTIN) -> Orthologs:
    """The built-in table (``builtin``) or a CSV file with ``human`` and ``mouse`` columns."""
    path = BUILTIN_TABLE if source == BUILTIN else Path(source)
    return _load(str(path.resolve()) if path.exists() else str(path))


@lru_cache(maxsize=4)
def _load(path: str) -> Orthologs:
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise OrthologError(f"ortholog table {p} does not exist; give a CSV with columns human,mouse "
                            f"or use the built-in one (orthologs = \"{BUILTIN}\")")
    try:
        table = pd.read_csv(p, comment="#", dtype=str)
    except Exception as e:  # a table pandas cannot parse
        raise OrthologError(f"ortholog table {p} is not a readable CSV ({type(e).__name__}: {e})") from None
    cols = {c.strip().lower(): c for c in table.columns}
    if not {"human", "mouse"} <= cols.keys():
        raise OrthologError(f"ortholog table {p} needs columns 'human' and 'mouse'; it has {list(table.columns)}")
    pairs = table[[cols["human"], cols["mouse"]]].dropna()
    pairs.columns = ["human", "mouse"]
    pairs = pairs.assign(human=pairs["human"].str.strip().str.upper(), mouse=pairs["mouse"].str.strip().str.upper())
    pairs = pairs[(pairs["human"] != "") & (pairs["mouse"] != "")].drop_duplicates()
    one = pairs[~pairs["human"].duplicated(keep=False) & ~pairs["mouse"].duplicated(keep=False)]
    one = one[one["human"] != one["mouse"]]
    return Orthologs(dict(zip(one["mouse"], one["human"])), str(p))
