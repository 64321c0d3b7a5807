import pytest
import torch
from _tolerance import TINY_DECODER_K, fp_tol

from distthink.errors import ConfigError
from distthink.models.inject import inject_placeholders
from distthink.tasks.molecule.encoder import GraphEncoder, GraphPrefix, collate_graphs, collate_sample_graphs
from distthink.tasks.molecule.graphs import smiles_to_graph

MOLS = ["CCO", "c1ccccc1O", "CC(=O)Oc1ccccc1C(=O)O", "[Na+]", "C[N+](C)(C)C"]


def _batch():
    return collate_graphs([smiles_to_graph(s) for s in MOLS])


def _tol(ref, layers, hidden, nodes=0):
    """fp32 GNN outputs computed in another order (node order, batch neighbours): per layer a neighbour sum
    (degree <= 4) and a 2-layer MLP of width `hidden`, then the pooling sum over `nodes`."""
    return fp_tol(torch.float32, ref.abs().max(), k=layers * (4 + 2 * hidden) + nodes)


@pytest.mark.parametrize("conv", ["gine", "gin"])
@pytest.mark.parametrize("pool", ["mean", "add", "max"])
def test_shapes(conv, pool):
    torch.manual_seed(0)
    enc = GraphEncoder(hidden=32, num_layers=2, conv=conv, pool=pool)
    b = _batch()
    out = enc(b)
    assert out.nodes.shape == (b.num_nodes, 32)
    assert out.pooled.shape == (len(MOLS), 32)
    assert torch.equal(out.batch, b.batch)
    assert torch.isfinite(out.pooled).all()


def test_single_data_without_batch_vector():
    enc = GraphEncoder(hidden=16, num_layers=1)
    out = enc(smiles_to_graph("CCO"))
    assert out.pooled.shape == (1, 16)


def test_pooled_output_is_permutation_invariant():
    torch.manual_seed(0)
    enc = GraphEncoder(hidden=32, num_layers=3).eval()
    g = smiles_to_graph("CC(=O)Oc1ccccc1C(=O)O")
    perm = torch.randperm(g.num_nodes, generator=torch.Generator().manual_seed(3))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(g.num_nodes)
    h = g.clone()
    h.x = g.x[perm]  # new node i is old node perm[i]
    h.edge_index = inv[g.edge_index]
    assert not torch.equal(h.x, g.x)
    a, b = enc(collate_graphs([g])), enc(collate_graphs([h]))
    torch.testing.assert_close(a.pooled, b.pooled, atol=_tol(a.pooled, 3, 32, g.num_nodes), rtol=0)
    # node states are permutation-equivariant
    torch.testing.assert_close(b.nodes, a.nodes[perm], atol=_tol(a.nodes, 3, 32), rtol=0)


def test_encoding_independent_of_batch_neighbours():
    torch.manual_seed(0)
    enc = GraphEncoder(hidden=32, num_layers=2).eval()
    alone = enc(collate_graphs([smiles_to_graph("c1ccccc1O")])).pooled[0]
    together = enc(_batch()).pooled[1]
    torch.testing.assert_close(alone, together, atol=_tol(alone, 2, 32, nodes=7), rtol=0)  # phenol: 7 heavy atoms


def test_gine_uses_bond_features_gin_does_not():
    torch.manual_seed(0)
    g = smiles_to_graph("C=CC")  # one double and one single bond
    g2 = g.clone()
    g2.edge_attr = g.edge_attr.clone()
    g2.edge_attr[:, 0] = 0  # pretend all bonds are single
    for conv, differs in (("gine", True), ("gin", False)):
        enc = GraphEncoder(hidden=16, num_layers=2, conv=conv).eval()
        d = (enc(g).pooled - enc(g2).pooled).abs().max().item()
        assert (d > 1e-6) == differs  # gin: the same computation on the same inputs, d == 0; gine: d = O(0.1)


def test_gradients_reach_every_parameter_through_injection():
    torch.manual_seed(0)
    H = 24
    prefix = GraphPrefix(GraphEncoder(hidden=16, num_layers=2), llm_hidden=H, k=2, mult=2)
    b = collate_graphs([smiles_to_graph(s) for s in MOLS[:3]])
    G = 99
    ids = torch.tensor([[1, G, G, 2], [G, G, 3, 4], [5, 6, G, G]])
    slot = prefix.slot(b, G, graphs_per_sample=torch.tensor([1, 1, 1]))
    assert slot.vectors.shape == (3, 2, H)
    out = inject_placeholders(ids, torch.zeros(3, 4, H), [slot])
    (out ** 2).sum().backward()
    missing = [n for n, p in prefix.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    # eps of GINE is trainable and gets gradient too; every parameter must learn
    assert missing == []


def test_bad_config_raises():
    with pytest.raises(ConfigError):
        GraphEncoder(num_layers=0)
    with pytest.raises(ConfigError):
        GraphEncoder(conv="gat")


def test_collate_sample_graphs_feeds_packed_injection():
    torch.manual_seed(0)
    g = {s: smiles_to_graph(s) for s in MOLS}
    # three packed samples: one molecule, none (text-only), two molecules
    batch, counts = collate_sample_graphs([[g["CCO"]], [], [g["[Na+]"], g["c1ccccc1O"]]])
    assert counts.tolist() == [1, 0, 2] and batch.num_graphs == 3
    prefix = GraphPrefix(GraphEncoder(hidden=16, num_layers=1), llm_hidden=8, k=1, mult=1).eval()
    G = 99
    ids = torch.tensor([[G, 1, 2, 3, G, 4, G]])
    seg = torch.tensor([[0, 0, 1, 1, 2, 2, 2]])
    out = inject_placeholders(ids, torch.zeros(1, 7, 8), [prefix.slot(batch, G, counts)], segment_ids=seg)
    with torch.no_grad():
        solo = prefix(collate_graphs([g["[Na+]"]]))[0, 0]
    # sample 2's first molecule lands on sample 2's first slot (encoded in another batch: 1 GNN layer of width 16,
    # then the projector's two GEMMs)
    torch.testing.assert_close(out[0, 4], solo, atol=_tol(solo, 2, 16, nodes=1), rtol=0)
    none, zero = collate_sample_graphs([[], []])
    assert none is None and zero.tolist() == [0, 0]


def test_swapping_one_molecule_changes_tiny_qwen3_logits_at_that_prompt_only():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from distthink.models.inject import embed_with_injection

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    model = Qwen3ForCausalLM(cfg).eval()
    prefix = GraphPrefix(GraphEncoder(hidden=32, num_layers=2), llm_hidden=64, k=2, mult=2).eval()
    G = 100
    ids = torch.tensor([[3, G, G, 4, 5], [6, 7, G, G, 8]])

    def logits(mols):
        batch, counts = collate_sample_graphs([[smiles_to_graph(m)] for m in mols])
        with torch.no_grad():
            emb = embed_with_injection(model, ids, [prefix.slot(batch, G, counts)])
            return model(inputs_embeds=emb).logits

    base, swapped = logits(["CCO", "c1ccccc1O"]), logits(["CCO", "CC(=O)O"])
    # the other molecule changes the graph batch, so row 0's molecule may round differently: tiny-decoder fp32 bound
    tol = fp_tol(torch.float32, base.abs().max(), k=TINY_DECODER_K)
    torch.testing.assert_close(swapped[0], base[0], atol=tol, rtol=0)
    torch.testing.assert_close(swapped[1, :2], base[1, :2], atol=tol, rtol=0)  # before the graph tokens (causal)
    assert (swapped[1, 2:] - base[1, 2:]).abs().amax(-1).min() > 1000 * tol
