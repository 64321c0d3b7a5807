"""SMILES -> torch_geometric graphs with RDKit.

Features are small categorical integers (one column per feature), the form that an embedding-per-column
encoder (see distthink/tasks/molecule/encoder.py) or :func:`one_hot_atoms` / :func:`one_hot_bonds` consume.
Every vocabulary ends with an "other" bucket, so an unusual atom never crashes the featuriser.

Atom columns of ``data.x`` (N, 6) long, in this order (:data:`ATOM_FEATURES`):

====  ================  =============================================================  ==========
col   name              values (index = position in the list; last index = other)       RDKit call
====  ================  =============================================================  ==========
0     element           H B C N O F Si P S Cl Se Br I Na K Li Mg Ca Fe Zn Cu Sn As, other  GetSymbol
1     degree            0 1 2 3 4 5 6, other                                            GetDegree
2     formal_charge     -2 -1 0 +1 +2, other                                            GetFormalCharge
3     aromatic          0 (no), 1 (yes)                                                 GetIsAromatic
4     hybridisation     S SP SP2 SP3 SP3D SP3D2, other (incl. UNSPECIFIED)              GetHybridization
5     total_hs          0 1 2 3 4, other                                                GetTotalNumHs
====  ================  =============================================================  ==========

Bond columns of ``data.edge_attr`` (E, 3) long (:data:`BOND_FEATURES`): bond type (SINGLE DOUBLE TRIPLE
AROMATIC, other), conjugated (0/1), in ring (0/1). Each chemical bond appears twice in ``edge_index``
(both directions), consecutively: edges 2i and 2i+1 are bond i, bonds sorted by (lower, higher) atom index.

Hydrogens are implicit (RDKit default), so ``total_hs`` carries them. ``data.smiles`` holds the canonical SMILES,
and atoms are numbered in canonical-SMILES output order, so two spellings of one molecule give identical graphs.

Conversion is cached: an in-process LRU keyed by the input string, and optionally an on-disk cache keyed by
the canonical SMILES (plus the feature-set version, so a feature change never reads stale graphs).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Sequence

import torch
from rdkit import Chem, rdBase
from torch_geometric.data import Data

from distthink.errors import DataError
from distthink.logging_utils import get_logger

log = get_logger(__name__)

FEATURE_VERSION = 1

ELEMENTS = ["H", "B", "C", "N", "O", "F", "Si", "P", "S", "Cl", "Se", "Br", "I", "Na", "K", "Li", "Mg", "Ca",
            "Fe", "Zn", "Cu", "Sn", "As"]
DEGREES = [0, 1, 2, 3, 4, 5, 6]
FORMAL_CHARGES = [-2, -1, 0, 1, 2]
HYBRIDISATIONS = ["S", "SP", "SP2", "SP3", "SP3D", "SP3D2"]
TOTAL_HS = [0, 1, 2, 3, 4]
BOND_TYPES = ["SINGLE", "DOUBLE", "TRIPLE", "AROMATIC"]

# name -> number of categories (including the trailing "other" bucket where there is one)
ATOM_FEATURES: "OrderedDict[str, int]" = OrderedDict([
    ("element", len(ELEMENTS) + 1),
    ("degree", len(DEGREES) + 1),
    ("formal_charge", len(FORMAL_CHARGES) + 1),
    ("aromatic", 2),
    ("hybridisation", len(HYBRIDISATIONS) + 1),
    ("total_hs", len(TOTAL_HS) + 1),
])
BOND_FEATURES: "OrderedDict[str, int]" = OrderedDict([
    ("bond_type", len(BOND_TYPES) + 1),
    ("conjugated", 2),
    ("in_ring", 2),
])
ATOM_DIMS = list(ATOM_FEATURES.values())
BOND_DIMS = list(BOND_FEATURES.values())

_EL = {e: i for i, e in enumerate(ELEMENTS)}
_DEG = {d: i for i, d in enumerate(DEGREES)}
_CHG = {c: i for i, c in enumerate(FORMAL_CHARGES)}
_HYB = {h: i for i, h in enumerate(HYBRIDISATIONS)}
_HS = {h: i for i, h in enumerate(TOTAL_HS)}
_BT = {b: i for i, b in enumerate(BOND_TYPES)}


def _idx(table: dict, key) -> int:
    return table.get(key, len(table))  # unknown -> "other" bucket


def atom_features(atom) -> list[int]:
    """The 6 categorical ints for one RDKit atom (see the module table)."""
    return [
        _idx(_EL, atom.GetSymbol()),
        _idx(_DEG, atom.GetDegree()),
        _idx(_CHG, atom.GetFormalCharge()),
        int(atom.GetIsAromatic()),
        _idx(_HYB, str(atom.GetHybridization())),
        _idx(_HS, atom.GetTotalNumHs()),
    ]


def bond_features(bond) -> list[int]:
    """The 3 categorical ints for one RDKit bond (see the module table)."""
    return [_idx(_BT, str(bond.GetBondType())), int(bond.GetIsConjugated()), int(bond.IsInRing())]


def parse_smiles(smiles: str, *, row: int | None = None, source: str | None = None, field_name: str = "smiles"):
    """RDKit Mol from SMILES, or DataError naming the row. Empty strings and zero-atom molecules are invalid."""
    if not isinstance(smiles, str) or not smiles.strip():
        raise DataError(f"empty or non-string SMILES {smiles!r}", source=source, line=row, field=field_name,
                        fix="give a valid SMILES string", reason="invalid_smiles")
    with rdBase.BlockLogs():  # RDKit would print parse errors to stderr; we raise a precise error instead
        mol = Chem.MolFromSmiles(smiles.strip())
    if mol is None or mol.GetNumAtoms() == 0:
        raise DataError(f"RDKit cannot parse SMILES {smiles!r}", source=source, line=row, field=field_name,
                        fix="correct the SMILES (check brackets, ring closures, valences) or set on_error: skip",
                        reason="invalid_smiles")
    return mol


def canonicalise(mol):
    """(mol renumbered into canonical SMILES output order, canonical SMILES). Featurising in this order makes
    the graph a function of the molecule alone, not of how its SMILES happened to be written."""
    canonical = Chem.MolToSmiles(mol)
    order = [int(i) for i in mol.GetProp("_smilesAtomOutputOrder").strip("[],").split(",") if i.strip()]
    return Chem.RenumberAtoms(mol, order), canonical


def mol_to_graph(mol, smiles: str | None = None):
    """torch_geometric ``Data`` with x (N,6) long, edge_index (2,2E) long, edge_attr (2E,3) long, smiles str."""
    x = torch.tensor([atom_features(a) for a in mol.GetAtoms()], dtype=torch.long).view(-1, len(ATOM_DIMS))
    src, dst, attrs = [], [], []
    # bonds sorted by their (lower, higher) atom index: the edge order depends on the atom numbering only
    bonds = sorted(mol.GetBonds(), key=lambda b: tuple(sorted((b.GetBeginAtomIdx(), b.GetEndAtomIdx()))))
    for b in bonds:
        i, j = sorted((b.GetBeginAtomIdx(), b.GetEndAtomIdx()))
        f = bond_features(b)
        src += [i, j]
        dst += [j, i]
        attrs += [f, f]
    edge_index = torch.tensor([src, dst], dtype=torch.long).view(2, -1)
    edge_attr = torch.tensor(attrs, dtype=torch.long).view(-1, len(BOND_DIMS))
    canon = Chem.MolToSmiles(mol) if smiles is None else smiles
    return Data(x=x, edge_index=edge_index, edge_attr=edge_attr, smiles=canon, num_nodes=x.shape[0])


class GraphCache:
    """SMILES -> graph conversion with an in-process LRU (keyed by the input string) and an optional on-disk
    cache (keyed by sha1 of the canonical SMILES + FEATURE_VERSION). Returned graphs are fresh clones, so a
    caller mutating one cannot corrupt the cache.

    ``hits``, ``misses`` and ``disk_hits`` count lookups (useful in tests and logs).
    """

    def __init__(self, maxsize: int = 100_000, cache_dir: str | os.PathLike | None = None):
        self.maxsize = maxsize
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._lru: OrderedDict[str, object] = OrderedDict()
        self.hits = self.misses = self.disk_hits = 0

    def _disk_path(self, canonical: str) -> Path:
        key = hashlib.sha1(f"v{FEATURE_VERSION}|{canonical}".encode()).hexdigest()
        return self.cache_dir / key[:2] / f"{key}.pt"

    def get(self, smiles: str, *, row: int | None = None, source: str | None = None):
        """Graph for ``smiles``; DataError naming ``row``/``source`` if it is invalid (invalid ones are not cached)."""
        if not isinstance(smiles, str):
            parse_smiles(smiles, row=row, source=source)  # raises the DataError naming the row
        key = smiles.strip()
        if key in self._lru:
            self._lru.move_to_end(key)
            self.hits += 1
            return self._lru[key].clone()
        self.misses += 1
        mol = parse_smiles(smiles, row=row, source=source)
        mol, canonical = canonicalise(mol)
        graph = None
        if self.cache_dir is not None:
            path = self._disk_path(canonical)
            if path.exists():
                graph = torch.load(path, weights_only=False)
                self.disk_hits += 1
        if graph is None:
            graph = mol_to_graph(mol, canonical)
            if self.cache_dir is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}")
                torch.save(graph, tmp)
                os.replace(tmp, path)  # atomic: concurrent ranks never read half-written files
        self._lru[key] = graph
        if len(self._lru) > self.maxsize:
            self._lru.popitem(last=False)
        return graph.clone()


_DEFAULT_CACHE = GraphCache()


def smiles_to_graph(smiles: str, *, row: int | None = None, source: str | None = None,
                    cache: GraphCache | None = None):
    """One SMILES -> ``Data`` (cached in-process by default). Invalid SMILES -> DataError naming row/source."""
    return (cache or _DEFAULT_CACHE).get(smiles, row=row, source=source)


@dataclass
class GraphConversion:
    """Result of :func:`smiles_to_graphs`: graphs, the input row index each came from, and skip counts."""

    graphs: list
    rows: list[int]
    skipped: Counter = field(default_factory=Counter)
    skipped_rows: list[int] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


def smiles_to_graphs(smiles: Sequence[str] | Iterable[str], *, on_error: Literal["raise", "skip"] = "raise",
                     source: str | None = None, first_row: int = 1, cache: GraphCache | None = None
                     ) -> GraphConversion:
    """Convert many SMILES. ``on_error='raise'``: the first invalid one raises DataError naming its row
    (``first_row`` is the number of the first item, 1 for JSONL line numbers). ``on_error='skip'``: invalid
    ones are skipped, counted under ``skipped['invalid_smiles']`` and logged once with their rows."""
    if on_error not in ("raise", "skip"):
        raise DataError(f"on_error must be 'raise' or 'skip', got {on_error!r}", field="on_error",
                        fix="set on_error: raise or on_error: skip")
    out = GraphConversion(graphs=[], rows=[])
    for i, smi in enumerate(smiles):
        row = first_row + i
        try:
            g = smiles_to_graph(smi, row=row, source=source, cache=cache)
        except DataError as err:
            if on_error == "raise":
                raise
            out.skipped[err.reason] += 1
            out.skipped_rows.append(row)
            continue
        out.graphs.append(g)
        out.rows.append(row)
    if out.num_skipped:
        shown = out.skipped_rows[:10]
        log.warning("skipped %d invalid SMILES%s (rows %s%s)", out.num_skipped, f" in {source}" if source else "",
                    shown, " ..." if len(out.skipped_rows) > 10 else "")
    return out


@dataclass
class MoleculeRecords:
    """Rows of a molecule JSONL file that converted, with their graphs. ``lines[i]`` is the 1-based line of
    ``records[i]``; ``skipped`` counts rows dropped under ``on_error='skip'`` by reason."""

    records: list[dict]
    graphs: list
    lines: list[int]
    skipped: Counter = field(default_factory=Counter)
    skipped_lines: list[int] = field(default_factory=list)


def load_molecule_jsonl(path: str | os.PathLike, *, smiles_field: str = "smiles",
                        on_error: Literal["raise", "skip"] = "raise", cache: GraphCache | None = None
                        ) -> MoleculeRecords:
    """Read a JSONL file of molecule records (e.g. the demo set) and convert each row's SMILES.

    Blank lines are ignored. Invalid JSON, a missing/non-string ``smiles_field`` or an invalid SMILES raise a
    DataError naming the file and line, or, with ``on_error='skip'``, are skipped and counted by reason
    (``invalid_json``, ``missing_smiles``, ``invalid_smiles``) and logged once.
    """
    if on_error not in ("raise", "skip"):
        raise DataError(f"on_error must be 'raise' or 'skip', got {on_error!r}", field="on_error",
                        fix="set on_error: raise or on_error: skip")
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", source=str(path), fix="check the data path in the config")
    out = MoleculeRecords(records=[], graphs=[], lines=[])
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"invalid JSON ({err.msg})", source=str(path), line=n,
                                    fix="each line must be one JSON object", reason="invalid_json") from None
                if not isinstance(rec, dict) or not isinstance(rec.get(smiles_field), str):
                    raise DataError("missing or non-string SMILES", source=str(path), line=n, field=smiles_field,
                                    fix=f"give every row a '{smiles_field}' string (or set smiles_field)",
                                    reason="missing_smiles")
                graph = smiles_to_graph(rec[smiles_field], row=n, source=str(path), cache=cache)
            except DataError as err:
                if on_error == "raise":
                    raise
                out.skipped[err.reason] += 1
                out.skipped_lines.append(n)
                continue
            out.records.append(rec)
            out.graphs.append(graph)
            out.lines.append(n)
    if out.skipped:
        log.warning("%s: skipped %d rows %s (lines %s%s)", path, sum(out.skipped.values()), dict(out.skipped),
                    out.skipped_lines[:10], " ..." if len(out.skipped_lines) > 10 else "")
    return out


def one_hot_atoms(x: torch.Tensor) -> torch.Tensor:
    """(N, 6) categorical atom features -> (N, sum(ATOM_DIMS)) float one-hot, columns in ATOM_FEATURES order."""
    return _one_hot(x, ATOM_DIMS)


def one_hot_bonds(edge_attr: torch.Tensor) -> torch.Tensor:
    """(E, 3) categorical bond features -> (E, sum(BOND_DIMS)) float one-hot, columns in BOND_FEATURES order."""
    return _one_hot(edge_attr, BOND_DIMS)


def _one_hot(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    offsets = torch.tensor([0] + dims[:-1], device=x.device).cumsum(0)
    out = torch.zeros(x.shape[0], sum(dims), device=x.device)
    if x.numel():
        out.scatter_(1, x + offsets, 1.0)
    return out
