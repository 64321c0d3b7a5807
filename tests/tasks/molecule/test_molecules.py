import pytest
import torch

from distthink.errors import DataError
from distthink.tasks.molecule.graphs import (
    ATOM_DIMS,
    BOND_DIMS,
    BOND_TYPES,
    ELEMENTS,
    FORMAL_CHARGES,
    HYBRIDISATIONS,
    GraphCache,
    one_hot_atoms,
    one_hot_bonds,
    smiles_to_graph,
    smiles_to_graphs,
)

EL, DEG, CHG, ARO, HYB, HS = range(6)


def test_benzene_facts():
    g = smiles_to_graph("c1ccccc1")
    assert g.num_nodes == 6 and g.x.shape == (6, 6)
    assert g.edge_index.shape == (2, 12) and g.edge_attr.shape == (12, 3)  # 6 bonds, both directions
    assert (g.x[:, EL] == ELEMENTS.index("C")).all()
    assert (g.x[:, DEG] == 2).all()  # heavy-atom degree
    assert (g.x[:, ARO] == 1).all()
    assert (g.x[:, HYB] == HYBRIDISATIONS.index("SP2")).all()
    assert (g.x[:, HS] == 1).all()
    assert (g.edge_attr[:, 0] == BOND_TYPES.index("AROMATIC")).all()
    assert (g.edge_attr[:, 1] == 1).all() and (g.edge_attr[:, 2] == 1).all()  # conjugated, in ring
    # each bond twice, as (i,j) then (j,i)
    ei = g.edge_index
    assert torch.equal(ei[:, 0::2], ei[:, 1::2].flip(0))


def test_ethanol_facts():
    g = smiles_to_graph("CCO")
    assert g.smiles == "CCO" and g.num_nodes == 3
    els = sorted(ELEMENTS[i] for i in g.x[:, EL].tolist())
    assert els == ["C", "C", "O"]
    by_el = {ELEMENTS[int(r[EL])] + str(int(r[DEG])): r for r in g.x}
    assert int(by_el["C1"][HS]) == 3 and int(by_el["C2"][HS]) == 2 and int(by_el["O1"][HS]) == 1
    assert (g.x[:, HYB] == HYBRIDISATIONS.index("SP3")).all()
    assert (g.x[:, ARO] == 0).all()
    assert (g.edge_attr[:, 0] == BOND_TYPES.index("SINGLE")).all()
    assert (g.edge_attr[:, 1:] == 0).all()  # not conjugated, not in ring


def test_charged_species_and_disconnected_fragments():
    g = smiles_to_graph("C[N+](C)(C)C.[Cl-]")  # tetramethylammonium chloride
    charges = sorted(FORMAL_CHARGES[i] for i in g.x[:, CHG].tolist())
    assert charges == [-1, 0, 0, 0, 0, 1]
    n = g.x[g.x[:, EL] == ELEMENTS.index("N")][0]
    assert int(n[DEG]) == 4 and int(n[HS]) == 0
    cl = g.x[g.x[:, EL] == ELEMENTS.index("Cl")][0]
    assert int(cl[DEG]) == 0
    assert g.edge_index.shape[1] == 8  # 4 C-N bonds; chloride has no edges
    ion = smiles_to_graph("[Na+]")
    assert ion.edge_index.shape == (2, 0) and ion.edge_attr.shape == (0, 3)
    nitro = smiles_to_graph("C[N+](=O)[O-]")
    assert BOND_TYPES.index("DOUBLE") in nitro.edge_attr[:, 0].tolist()


def test_unknown_element_goes_to_other_bucket():
    g = smiles_to_graph("[Au]")
    assert int(g.x[0, EL]) == len(ELEMENTS)  # "other"
    assert (g.x < torch.tensor(ATOM_DIMS)).all()


def test_two_spellings_give_identical_graphs():
    a, b = smiles_to_graph("OCC"), smiles_to_graph("C(O)C")
    assert a.smiles == b.smiles == "CCO"
    assert torch.equal(a.x, b.x) and torch.equal(a.edge_index, b.edge_index) and torch.equal(a.edge_attr, b.edge_attr)


@pytest.mark.parametrize("bad", ["C1CC", "not a smiles", "C(C", "", "   ", "[Xx]", "c1cccc1"])
def test_invalid_smiles_raise_naming_row(bad):
    with pytest.raises(DataError, match=r"data.jsonl, line 7, field 'smiles'") as exc:
        smiles_to_graph(bad, row=7, source="data.jsonl")
    assert exc.value.reason == "invalid_smiles"


def test_batch_raise_and_skip_count():
    smi = ["CCO", "C1CC", "c1ccccc1", "xyz"]
    with pytest.raises(DataError, match="line 2"):
        smiles_to_graphs(smi, source="mols.jsonl")
    out = smiles_to_graphs(smi, on_error="skip", source="mols.jsonl")
    assert [g.smiles for g in out.graphs] == ["CCO", "c1ccccc1"]
    assert out.rows == [1, 3] and out.skipped_rows == [2, 4]
    assert out.skipped["invalid_smiles"] == 2 and out.num_skipped == 2
    with pytest.raises(DataError, match="on_error"):
        smiles_to_graphs(smi, on_error="ignore")


def test_cache_lru_and_disk(tmp_path):
    cache = GraphCache(maxsize=2, cache_dir=tmp_path)
    g1 = cache.get("CCO")
    g1.x[:] = 0  # mutating a returned graph must not corrupt the cache
    g2 = cache.get("CCO")
    assert cache.hits == 1 and cache.misses == 1 and g2.x.sum() > 0
    cache.get("CCN"), cache.get("CCC")  # evicts CCO from the LRU (maxsize 2)
    fresh = GraphCache(cache_dir=tmp_path)  # new process, same disk cache: keyed by canonical SMILES
    g3 = fresh.get("OCC")
    assert fresh.disk_hits == 1 and torch.equal(g3.x, g2.x) and g3.smiles == "CCO"
    with pytest.raises(DataError):
        cache.get("C1CC")
    assert len(list(tmp_path.rglob("*.pt"))) == 3


def test_one_hot_roundtrip():
    g = smiles_to_graph("CC(=O)Oc1ccccc1C(=O)O")  # aspirin
    oh = one_hot_atoms(g.x)
    assert oh.shape == (g.num_nodes, sum(ATOM_DIMS)) and (oh.sum(1) == len(ATOM_DIMS)).all()
    ob = one_hot_bonds(g.edge_attr)
    assert ob.shape == (g.edge_index.shape[1], sum(BOND_DIMS)) and (ob.sum(1) == len(BOND_DIMS)).all()
    # the first block of columns is the element one-hot
    assert torch.equal(oh[:, : ATOM_DIMS[0]].argmax(1), g.x[:, 0])


# ---- demo captioning set (distthink/tasks/molecule/demo.py + shipped JSONL) ----

def test_aspirin_caption_from_rdkit_facts():
    from rdkit import Chem

    from distthink.tasks.molecule.demo import caption_from_facts, molecule_facts

    f = molecule_facts(Chem.MolFromSmiles("CC(=O)Oc1ccccc1C(=O)O"))
    # aspirin: C9H8O4, MW 180.16, one benzene ring, a carboxylic acid and an (aryl) ester
    assert f["mol_weight"] == pytest.approx(180.16, abs=0.01) and f["mw_class"] == "medium-sized"
    assert f["num_rings"] == 1 and f["num_aromatic_rings"] == 1 and f["elements"] == ["C", "O"]
    assert f["groups"]["fr_benzene"] == 1 and f["groups"]["fr_COO"] == 1 and f["groups"]["fr_ester"] == 1
    assert (f["hbd"], f["hba"]) == (1, 3)
    assert caption_from_facts(f) == (
        "This molecule has 1 ring (all aromatic). It contains 1 benzene ring, 1 carboxylic acid, 1 ester and "
        "1 C-O-C oxygen. Its heavy atoms are C and O. It is a medium-sized molecule (180 to 300 Da) with "
        "1 hydrogen-bond donor and 3 hydrogen-bond acceptors.")
    hexane = molecule_facts(Chem.MolFromSmiles("CCCCCC"))
    assert caption_from_facts(hexane).startswith("This molecule is acyclic. It has none of the common functional")


def _same_rdkit_as_shipped():
    import rdkit

    from distthink.tasks.molecule.demo import demo_meta

    built = demo_meta().get("rdkit_version")
    if built != rdkit.__version__:
        pytest.skip(f"shipped demo set was built with RDKit {built}, this is {rdkit.__version__}: canonical SMILES "
                    "and fragment SMARTS may differ; regenerate with `python -m distthink.tasks.molecule.demo`")


def test_shipped_demo_set_splits():
    from distthink.tasks.molecule.demo import demo_meta, load_demo

    train, test = load_demo("train"), load_demo("test")
    assert 200 <= len(train) + len(test) <= 400 and 0.1 <= len(test) / (len(train) + len(test)) <= 0.3
    assert not {r["smiles"] for r in train} & {r["smiles"] for r in test}  # held-out molecules
    assert demo_meta()["counts"] == {"train": len(train), "test": len(test)}


def test_shipped_demo_set_is_consistent():
    from rdkit import Chem

    from distthink.tasks.molecule.demo import caption_from_facts, load_demo, molecule_facts, split_of

    _same_rdkit_as_shipped()
    train, test = load_demo("train"), load_demo("test")
    assert 200 <= len(train) + len(test) <= 400 and 0.1 <= len(test) / (len(train) + len(test)) <= 0.3
    assert not {r["smiles"] for r in train} & {r["smiles"] for r in test}  # held-out molecules
    for r in train + test:
        mol = Chem.MolFromSmiles(r["smiles"])
        assert Chem.MolToSmiles(mol) == r["smiles"]
        assert split_of(r["smiles"]) == r["split"]
        assert r["description"] == caption_from_facts(molecule_facts(mol))  # caption = f(graph)
    g = smiles_to_graphs([r["smiles"] for r in test])
    assert g.num_skipped == 0 and len(g.graphs) == len(test)
    with pytest.raises(DataError, match="unknown demo split"):
        load_demo("valid")


def test_shipped_demo_files_equal_a_fresh_build():
    from distthink.tasks.molecule.demo import SPLIT_FILES, build_demo_records, load_demo

    _same_rdkit_as_shipped()
    records = build_demo_records()
    for split in SPLIT_FILES:
        assert load_demo(split) == [r for r in records if r["split"] == split]


def test_caption_messages_graph_and_text_only():
    from distthink.tasks.molecule.demo import caption_messages

    m = caption_messages("CCO", "desc", k=2)
    assert m[0]["content"].endswith("/no_think") and m[-1] == {"role": "assistant", "content": "desc"}
    assert m[1]["content"].count("<|graph|>") == 2 and "SMILES: CCO" in m[1]["content"]
    t = caption_messages("CCO", use_graph=False, thinking=True)
    assert "<|graph|>" not in t[1]["content"] and "/no_think" not in t[0]["content"] and len(t) == 2
    with pytest.raises(DataError):
        caption_messages("CCO", use_graph=False, include_smiles=False)


def test_load_molecule_jsonl_raise_and_skip(tmp_path):
    from distthink.tasks.molecule.graphs import load_molecule_jsonl

    p = tmp_path / "mols.jsonl"
    p.write_text('{"smiles": "CCO", "description": "ethanol"}\n\n{"smiles": "C1CC"}\n{"name": "x"}\nnot json\n'
                 '{"smiles": "c1ccccc1"}\n')
    with pytest.raises(DataError, match=r"mols.jsonl, line 3, field 'smiles': RDKit cannot parse"):
        load_molecule_jsonl(p)
    out = load_molecule_jsonl(p, on_error="skip")
    assert out.lines == [1, 6] and [g.smiles for g in out.graphs] == ["CCO", "c1ccccc1"]
    assert out.records[0]["description"] == "ethanol"
    assert dict(out.skipped) == {"invalid_smiles": 1, "missing_smiles": 1, "invalid_json": 1}
    assert out.skipped_lines == [3, 4, 5]
    with pytest.raises(DataError, match="file not found"):
        load_molecule_jsonl(tmp_path / "nope.jsonl")


def test_non_string_smiles_raise_naming_row():
    for bad in (None, 3.0, ["CCO"]):
        with pytest.raises(DataError, match="line 4"):
            smiles_to_graph(bad, row=4)
