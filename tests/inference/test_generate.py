"""distthink.inference.generate: batched left-padded generation equals one-by-one generation, the inputs_embeds path
equals HF's input_ids path, graphs really condition the output, the thinking budget forces </think>,
seeded sampling is reproducible; `distthink generate` + `distthink eval captions` end to end on an export."""

import json

import pytest
import torch

from distthink.cli import main as cli_main
from distthink.inference.generate import GenerationOptions, Generator, load_generator
from distthink.models.inject import add_placeholder_tokens
from distthink.models.tiny import tiny_qwen3_config, tiny_tokenizer
from distthink.tasks.molecule.demo import caption_messages, load_demo
from distthink.tasks.molecule.graphs import smiles_to_graph
from distthink.tasks.molecule.model import (
    GraphPromptInputs,
    build_prefix,
    load_graph_prompt_inputs,
    molecule_inputs_embeds,
    save_prefix,
)
from distthink.tasks.molecule.options import GRAPH_TOKEN

GRAPH = {"conv": "gine", "hidden": 16, "num_layers": 2, "pool": "mean", "dropout": 0.0, "proj_mult": 2,
         "graph_tokens": 2}


@pytest.fixture(scope="module")
def gen():
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer("qwen3")
    gid = add_placeholder_tokens(tok, [GRAPH_TOKEN])[GRAPH_TOKEN]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_qwen3_config(vocab_size=len(tok)), attn_implementation="sdpa")
    prefix = build_prefix(GRAPH, model.config.hidden_size)
    with torch.no_grad():  # a projector output large enough to move the logits of a random model
        prefix.projector.net[-1].weight.mul_(50)
    meta = {**GRAPH, "graph_token": GRAPH_TOKEN, "use_graph": True, "include_smiles": True, "think_mode": "off"}
    return Generator(model.eval(), tok, GraphPromptInputs(prefix.eval(), gid), meta)


def _prompts(n, use_graph=True):
    recs = load_demo("test")[:n]
    msgs = [caption_messages(r["smiles"], use_graph=use_graph, k=2) for r in recs]
    graphs = [[smiles_to_graph(r["smiles"])] if use_graph else [] for r in recs]
    return msgs, graphs


def test_batched_left_padded_equals_one_by_one(gen):
    msgs, graphs = _prompts(4)
    opts = GenerationOptions(max_new_tokens=12, batch_size=4)
    batched = list(gen.generate(msgs, graphs, opts))
    single = list(gen.generate(msgs, graphs, GenerationOptions(max_new_tokens=12, batch_size=1)))
    assert [b["raw"] for b in batched] == [s["raw"] for s in single]
    assert all(r["finish_reason"] in ("stop", "length") and {"reasoning", "answer", "raw"} <= r.keys() for r in batched)


def test_inputs_embeds_path_equals_input_ids_generation(gen):
    msgs, graphs = _prompts(1, use_graph=False)
    rec = next(gen.generate(msgs, graphs, GenerationOptions(max_new_tokens=10)))
    ids = gen.tokenizer.encode(gen.render(msgs[0], False), add_special_tokens=False)
    out = gen.model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=gen.stop_ids,
                             pad_token_id=gen.tokenizer.pad_token_id)
    new = out[0, len(ids):].tolist()
    new = new[:next((i for i, t in enumerate(new) if t in gen.stop_ids), len(new))]
    assert rec["raw"] == gen.tokenizer.decode(new, skip_special_tokens=False)


def test_graph_vectors_condition_the_generation(gen):
    msgs, graphs = _prompts(1)
    opts = GenerationOptions(max_new_tokens=1)
    ids = torch.tensor([gen.tokenizer.encode(gen.render(msgs[0], False), add_special_tokens=False)])
    from distthink.tasks.molecule.encoder import collate_sample_graphs
    b1, c1 = collate_sample_graphs([[smiles_to_graph("CCO")]])
    b2, c2 = collate_sample_graphs([[smiles_to_graph("c1ccccc1C(=O)O")]])
    e1 = molecule_inputs_embeds(gen.model, gen.prompt_inputs.prefix, ids, gen.prompt_inputs.graph_token_id, b1, c1)
    e2 = molecule_inputs_embeds(gen.model, gen.prompt_inputs.prefix, ids, gen.prompt_inputs.graph_token_id, b2, c2)
    diff = (e1 - e2).abs().sum(-1)[0]
    assert set(torch.nonzero(diff).view(-1).tolist()) == set(torch.nonzero(ids[0] == gen.prompt_inputs.graph_token_id).view(-1).tolist())
    l1 = gen.model(inputs_embeds=e1).logits[0, -1]
    l2 = gen.model(inputs_embeds=e2).logits[0, -1]
    assert not torch.allclose(l1, l2)
    assert next(gen.generate(msgs, graphs, opts))["num_new_tokens"] == 1
    with pytest.raises(Exception, match="no graphs"):
        molecule_inputs_embeds(gen.model, gen.prompt_inputs.prefix, ids, gen.prompt_inputs.graph_token_id, None, None)


def test_think_budget_forces_close_tag(gen):
    msgs, graphs = _prompts(3)
    opts = GenerationOptions(enable_thinking=True, max_think_tokens=3, max_new_tokens=8, do_sample=True,
                             temperature=1.5, seed=1)
    recs = list(gen.generate(msgs, graphs, opts))
    for r in recs:
        assert r["num_think_tokens"] is not None and r["num_think_tokens"] <= 3 and "</think>" in r["raw"]
        assert r["think_state"] in ("closed", "empty")
    assert any(r["think_budget_hit"] for r in recs)
    again = list(gen.generate(msgs, graphs, opts))
    assert [r["raw"] for r in again] == [r["raw"] for r in recs]  # seeded sampling is reproducible


def test_bad_options_refused(gen):
    msgs, graphs = _prompts(1)
    with pytest.raises(Exception, match="Fix"):
        list(gen.generate(msgs, graphs, GenerationOptions(do_sample=True, temperature=0.0)))


def test_cli_generate_and_eval_from_export(gen, tmp_path, capsys):
    export = tmp_path / "export"
    gen.model.save_pretrained(export)
    gen.tokenizer.save_pretrained(export)
    save_prefix(gen.prompt_inputs.prefix, gen.meta, export)
    loaded = load_generator(export, prompt_inputs_loader=load_graph_prompt_inputs)
    assert loaded.prompt_inputs.graph_token_id == gen.prompt_inputs.graph_token_id
    assert loaded.prompt_inputs.prefix is not None
    out = tmp_path / "g.jsonl"
    assert cli_main(["generate", str(export), "--input", "demo", "--out", str(out), "--limit", "3",
                     "--max-new-tokens", "6", "--no-progress"]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    ref = list(gen.generate(*_prompts(3), GenerationOptions(max_new_tokens=6)))
    assert [r["raw"] for r in recs] == [r["raw"] for r in ref]
    assert [r["id"] for r in recs] == [r["id"] for r in load_demo("test")[:3]]
    capsys.readouterr()
    assert cli_main(["eval", "captions", "--generations", str(out), "--out", str(tmp_path / "p.parquet")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_samples"] == 3 and 0.0 <= summary["bleu4"] <= 1.0
    assert (tmp_path / "p.parquet").stat().st_size > 0


def test_generator_computes_in_the_requested_dtype_with_an_attention_that_runs(gen, tmp_path):
    """`generate --dtype` (auto = bf16 on cuda): the LM and the graph prefix load in that dtype, and the attention is
    the one that can run there (distthink.config.resolve_attention: sdpa on this CPU)."""
    export = tmp_path / "export"
    gen.model.save_pretrained(export)
    gen.tokenizer.save_pretrained(export)
    save_prefix(gen.prompt_inputs.prefix, gen.meta, export)
    loaded = load_generator(export, dtype=torch.bfloat16, prompt_inputs_loader=load_graph_prompt_inputs)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in loaded.prompt_inputs.prefix.parameters()} == {torch.bfloat16}
    assert loaded.model.config._attn_implementation == "sdpa"
    recs = list(loaded.generate(*_prompts(2), GenerationOptions(max_new_tokens=4)))
    assert len(recs) == 2 and all(r["num_new_tokens"] > 0 for r in recs)
    out = tmp_path / "g.jsonl"
    assert cli_main(["generate", str(export), "--input", "demo", "--out", str(out), "--limit", "2", "--dtype",
                     "bfloat16", "--device", "cpu", "--max-new-tokens", "4", "--no-progress"]) == 0
    assert len(out.read_text().splitlines()) == 2


def test_placeholder_tokens_are_never_generated(gen):
    """`<|graph|>` is an input slot. A generated one (a young model in free mode samples anything) made the next
    training step fail: the sample then had more graph tokens than graphs. The generator suppresses the hook's
    placeholder ids."""
    gid = gen.prompt_inputs.graph_token_id

    def rig(module, args, logits):  # make <|graph|> the greedy choice at every position
        logits = logits.clone()
        logits[..., gid] += 1e4
        return logits

    handle = gen.model.get_output_embeddings().register_forward_hook(rig)
    msgs, graphs = _prompts(2)
    prompts = [gen.tokenizer.encode(gen.render(m, False), add_special_tokens=False) for m in msgs]
    hook = gen.prompt_inputs
    try:
        out, _ = gen.generate_ids(prompts, graphs, GenerationOptions(max_new_tokens=6))
        assert all(gid not in row for row in out), out
        gen.prompt_inputs = type("Leaky", (), {"inputs_embeds": hook.inputs_embeds})()  # no placeholder_ids
        leaky, _ = gen.generate_ids(prompts, graphs, GenerationOptions(max_new_tokens=6))
        assert all(row[0] == gid for row in leaky)  # without the suppression the rigged head picks it
    finally:
        gen.prompt_inputs = hook
        handle.remove()
