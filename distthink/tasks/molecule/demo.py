"""The demo molecule-captioning set shipped with the package, and the generator that builds it.

Honest by construction:
- the molecules are real: SMILES from RDKit's bundled NCI sample (``rdkit/Data/NCI/first_5K.smi``, the first
  5000 structures of the public NCI open database), filtered to single-fragment organic molecules with
  8-30 heavy atoms, de-duplicated by canonical SMILES, and sampled evenly through the file;
- each caption is a *deterministic function of the molecular graph*: functional groups counted by RDKit's
  fragment functions (``rdkit.Chem.Fragments.fr_*``), ring and aromatic-ring counts, the heavy elements, the
  molecular-weight class and the Lipinski H-bond donor/acceptor counts. A model that reads the graph can
  therefore learn the captions exactly; a model that only reads the SMILES string has to parse chemistry
  from text, which is the point of the graph-vs-text ablation in issue 8;
- the held-out test split is chosen by a hash of the canonical SMILES (stable across machines and RDKit
  versions that keep the same canonical form), never by position.

Regenerate the shipped files with ``python -m distthink.tasks.molecule.demo`` (``--check`` verifies that the
shipped files equal a fresh build).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import rdkit
from rdkit import Chem, RDConfig, rdBase
from rdkit.Chem import Descriptors, Fragments, Lipinski, rdMolDescriptors

from distthink.errors import DataError
from distthink.resources import ASSETS

ASSET_DIR = ASSETS / "molecules"
SPLIT_FILES = {"train": "demo_train.jsonl", "test": "demo_test.jsonl"}
META_FILE = "demo_meta.json"
DEFAULT_N = 320
TEST_FRACTION = 0.2
ALLOWED_ELEMENTS = ("C", "N", "O", "S", "F", "Cl", "Br", "I", "P")
MIN_HEAVY, MAX_HEAVY = 8, 30

# (RDKit fragment function, singular, plural). The order is the order of mention in captions. The names say
# what RDKit's SMARTS (rdkit/Data/FragmentDescriptors.csv) actually match, not the looser textbook name.
FUNCTIONAL_GROUPS: list[tuple[str, str, str]] = [
    ("fr_benzene", "benzene ring", "benzene rings"),
    ("fr_pyridine", "pyridine ring", "pyridine rings"),
    ("fr_furan", "furan ring", "furan rings"),
    ("fr_thiophene", "thiophene ring", "thiophene rings"),
    ("fr_imidazole", "imidazole ring", "imidazole rings"),
    ("fr_thiazole", "thiazole ring", "thiazole rings"),
    ("fr_COO", "carboxylic acid", "carboxylic acids"),
    ("fr_ester", "ester", "esters"),
    ("fr_lactone", "lactone", "lactones"),
    ("fr_amide", "amide", "amides"),
    ("fr_imide", "imide", "imides"),
    ("fr_urea", "urea group", "urea groups"),
    ("fr_ketone", "ketone", "ketones"),
    ("fr_aldehyde", "aldehyde", "aldehydes"),
    ("fr_Al_OH", "aliphatic hydroxyl group", "aliphatic hydroxyl groups"),
    ("fr_phenol", "phenolic OH on a benzene ring", "phenolic OHs on benzene rings"),
    ("fr_ether", "C-O-C oxygen", "C-O-C oxygens"),  # RDKit: [OD2]([#6])[#6], esters included
    ("fr_methoxy", "methoxy group", "methoxy groups"),
    ("fr_NH2", "NH2 nitrogen", "NH2 nitrogens"),  # RDKit fr_NH* count N by H count,
    ("fr_NH1", "NH nitrogen", "NH nitrogens"),  # not true amine classes: the
    ("fr_NH0", "nitrogen without hydrogen", "nitrogens without hydrogen"),  # names say so
    ("fr_aniline", "aniline", "anilines"),
    ("fr_nitro", "nitro group", "nitro groups"),
    ("fr_nitrile", "nitrile", "nitriles"),
    ("fr_azo", "azo group", "azo groups"),
    ("fr_hdrzone", "hydrazone", "hydrazones"),
    ("fr_oxime", "oxime", "oximes"),
    ("fr_guanido", "guanidine group", "guanidine groups"),
    ("fr_sulfonamd", "sulfonamide", "sulfonamides"),
    ("fr_sulfone", "sulfone", "sulfones"),
    ("fr_sulfide", "thioether", "thioethers"),
    ("fr_SH", "thiol", "thiols"),
    ("fr_halogen", "halogen atom", "halogen atoms"),
    ("fr_epoxide", "epoxide ring", "epoxide rings"),
]

# molecular-weight classes (Da): upper bounds are exclusive
MW_CLASSES = [(180.0, "light", "under 180 Da"), (300.0, "medium-sized", "180 to 300 Da"),
              (float("inf"), "heavy", "300 Da or more")]


def nci_source_path() -> Path:
    """Path of RDKit's bundled NCI sample; DataError if this RDKit build does not ship it."""
    path = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"
    if not path.exists():
        raise DataError(f"RDKit's bundled NCI sample is missing at {path}", source=str(path),
                        fix="install an rdkit wheel that ships rdkit/Data (pip install rdkit), or use the shipped "
                            "JSONL files under distthink/assets/molecules/")
    return path


def molecule_facts(mol) -> dict:
    """The RDKit facts a caption is made of. Every one is a function of the molecular graph."""
    groups = {}
    for fn, _, _ in FUNCTIONAL_GROUPS:
        n = int(getattr(Fragments, fn)(mol))
        if n:
            groups[fn] = n
    mw = float(Descriptors.MolWt(mol))
    mw_class = next(name for bound, name, _ in MW_CLASSES if mw < bound)
    elements = sorted({a.GetSymbol() for a in mol.GetAtoms()}, key=lambda e: (e != "C", e))
    return {
        "num_heavy_atoms": mol.GetNumAtoms(),
        "num_rings": int(rdMolDescriptors.CalcNumRings(mol)),
        "num_aromatic_rings": int(rdMolDescriptors.CalcNumAromaticRings(mol)),
        "elements": elements,
        "mol_weight": round(mw, 2),
        "mw_class": mw_class,
        "hbd": int(Lipinski.NumHDonors(mol)),
        "hba": int(Lipinski.NumHAcceptors(mol)),
        "groups": groups,
    }


def _count(n: int, singular: str, plural: str) -> str:
    return f"{n} {singular if n == 1 else plural}"


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def caption_from_facts(f: dict) -> str:
    """Deterministic English caption from :func:`molecule_facts` output."""
    parts = []
    if f["num_rings"] == 0:
        parts.append("This molecule is acyclic.")
    else:
        arom = f["num_aromatic_rings"]
        arom_txt = "none aromatic" if arom == 0 else ("all aromatic" if arom == f["num_rings"] else f"{arom} aromatic")
        parts.append(f"This molecule has {_count(f['num_rings'], 'ring', 'rings')} ({arom_txt}).")
    groups = [_count(f["groups"][fn], s, p) for fn, s, p in FUNCTIONAL_GROUPS if fn in f["groups"]]
    parts.append(f"It contains {_join(groups)}." if groups else "It has none of the common functional groups.")
    els = f["elements"]
    parts.append(f"Its heavy atoms are all {els[0]}." if len(els) == 1 else f"Its heavy atoms are {_join(els)}.")
    mw_range = next(rng for _, name, rng in MW_CLASSES if name == f["mw_class"])
    parts.append(f"It is a {f['mw_class']} molecule ({mw_range}) with "
                 f"{_count(f['hbd'], 'hydrogen-bond donor', 'hydrogen-bond donors')} and "
                 f"{_count(f['hba'], 'hydrogen-bond acceptor', 'hydrogen-bond acceptors')}.")
    return " ".join(parts)


def split_of(canonical_smiles: str, test_fraction: float = TEST_FRACTION) -> str:
    """'test' or 'train', from a hash of the canonical SMILES (deterministic, independent of file order)."""
    h = int(hashlib.sha1(canonical_smiles.encode()).hexdigest()[:8], 16)
    return "test" if h < test_fraction * 0x1_0000_0000 else "train"


def build_demo_records(n: int = DEFAULT_N, source: Path | None = None) -> list[dict]:
    """Select ``n`` molecules evenly through the NCI sample and caption them. Deterministic."""
    source = source or nci_source_path()
    candidates = []
    seen = set()
    with open(source) as fh, rdBase.BlockLogs():
        for line in fh:
            fields = line.split()
            if len(fields) < 2:
                continue
            smi, nci_id = fields[0], fields[1]
            mol = Chem.MolFromSmiles(smi)
            if mol is None:  # a few NCI entries have impossible valences; they are simply not candidates
                continue
            canonical = Chem.MolToSmiles(mol)
            if "." in canonical or canonical in seen:
                continue
            if not MIN_HEAVY <= mol.GetNumAtoms() <= MAX_HEAVY:
                continue
            if not {a.GetSymbol() for a in mol.GetAtoms()} <= set(ALLOWED_ELEMENTS):
                continue
            seen.add(canonical)
            candidates.append((nci_id, canonical, mol))
    if len(candidates) < n:
        raise DataError(f"only {len(candidates)} usable molecules in the NCI sample, {n} requested",
                        source=str(source), fix=f"request at most {len(candidates)}")
    stride = len(candidates) / n
    records = []
    for i in range(n):
        nci_id, canonical, mol = candidates[int(i * stride)]
        facts = molecule_facts(mol)
        records.append({"id": f"nci-{nci_id}", "smiles": canonical, "description": caption_from_facts(facts),
                        "split": split_of(canonical), "facts": facts})
    return records


def write_demo(out_dir: Path = ASSET_DIR, n: int = DEFAULT_N) -> dict[str, int]:
    """Write demo_train.jsonl / demo_test.jsonl under ``out_dir``; returns the row count per split."""
    records = build_demo_records(n)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, name in SPLIT_FILES.items():
        rows = [r for r in records if r["split"] == split]
        with open(out_dir / name, "w") as fh:
            for r in rows:
                fh.write(json.dumps(r, sort_keys=True) + "\n")
        counts[split] = len(rows)
    meta = {"rdkit_version": rdkit.__version__, "n": n, "counts": counts,
            "source": "rdkit/Data/NCI/first_5K.smi", "test_fraction": TEST_FRACTION}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return counts


def demo_meta(asset_dir: Path = ASSET_DIR) -> dict:
    """How the shipped files were built (RDKit version, size, counts). Canonical SMILES and fragment SMARTS
    can change between RDKit releases, so a fresh build is only expected to match under the same version."""
    path = asset_dir / META_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def load_demo(split: str = "train", asset_dir: Path = ASSET_DIR) -> list[dict]:
    """Records of the shipped demo set: dicts with id, smiles, description, split, facts."""
    if split not in SPLIT_FILES:
        raise DataError(f"unknown demo split {split!r}", field="split", fix=f"use one of {sorted(SPLIT_FILES)}")
    path = asset_dir / SPLIT_FILES[split]
    if not path.exists():
        raise DataError("demo molecule file is missing", source=str(path),
                        fix="run `python -m distthink.tasks.molecule.demo` to regenerate it")
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def caption_messages(smiles: str, description: str | None = None, *, use_graph: bool = True,
                     graph_token: str = "<|graph|>", k: int = 1, include_smiles: bool = True,
                     thinking: bool = False) -> list[dict]:
    """Chat messages for one captioning sample (system, user, and the assistant target when given).

    - ``use_graph``: put ``k`` copies of ``graph_token`` in the user turn (the injection slots). The text-only
      ablation is ``use_graph=False, include_smiles=True``: same prompt, no graph tokens.
    - ``thinking=False`` puts ``/no_think`` in the system prompt (Qwen3's soft switch); render the template with
      ``enable_thinking=False`` as well. ``thinking=True`` leaves it out.
    """
    if not use_graph and not include_smiles:
        raise DataError("a captioning prompt needs the graph, the SMILES, or both",
                        fix="set use_graph=True or include_smiles=True")
    system = "You describe molecules: their rings, functional groups, heavy atoms, size and hydrogen bonding."
    if not thinking:
        system += " /no_think"
    bits = []
    if use_graph:
        bits.append("Molecular graph: " + graph_token * k)
    if include_smiles:
        bits.append(f"SMILES: {smiles}")
    bits.append("Describe this molecule.")
    msgs = [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(bits)}]
    if description is not None:
        msgs.append({"role": "assistant", "content": description})
    return msgs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ASSET_DIR)
    ap.add_argument("-n", type=int, default=DEFAULT_N)
    ap.add_argument("--check", action="store_true", help="verify the files under --out equal a fresh build")
    args = ap.parse_args(argv)
    if args.check:
        records = build_demo_records(args.n)
        for split, name in SPLIT_FILES.items():
            want = [r for r in records if r["split"] == split]
            if load_demo(split, args.out) != want:
                print(f"{args.out / name} differs from a fresh build", file=sys.stderr)
                return 1
        print("demo molecule files are up to date")
        return 0
    counts = write_demo(args.out, args.n)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
