"""`distthink plan` end to end: config -> shapes -> table / JSON, recommendation, dataset size, errors."""

import json

import pytest

from distthink.cli import main
from distthink.commands.plan import parse_bytes

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
             "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "max_position_embeddings": 8192, "rms_norm_eps": 1e-05,
             "rope_theta": 500000.0, "tie_word_embeddings": False}


@pytest.fixture
def llama_dir(tmp_path):
    d = tmp_path / "llama3-8b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA3_8B))
    return d


def _plan_json(capsys, *argv):
    rc = main(["plan", *argv, "--json"])
    return rc, json.loads(capsys.readouterr().out)


def _llama_args(llama_dir, *extra):
    """Overrides (key=value) stay together, then the options (argparse reads one run of positionals)."""
    overrides = [x for x in extra if "=" in x and not x.startswith("--")]
    options = [x for x in extra if x not in overrides]
    return [f"model.from_config={llama_dir}", "model.tokenizer=tiny", "lora.enabled=false", "batch.max_tokens=4096",
            "data.max_length=4096", "model.gradient_checkpointing=true", "train.max_steps=0", *overrides, "--dataset-tokens", "1e9",
            *options]


def test_default_config_prints_every_candidate_and_a_recommendation(capsys):
    rc = main(["plan", "--nodes", "1", "--gpus-per-node", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    for word in ("ddp", "zero2", "zero3", "z3+off-opt", "z3+off-par", "activations", "fused loss", "tokens/s",
                 "ETA", "recommended:"):
        assert word in out


def test_llama3_8b_full_finetune_on_h100_nodes(capsys, llama_dir):
    totals = {}
    for nodes in (1, 2, 8):
        rc, plan = _plan_json(capsys, *_llama_args(llama_dir, "--nodes", str(nodes), "--gpus-per-node", "8"))
        assert rc == 0
        est = {c["candidate"]: c for c in plan["candidates"]}
        assert plan["model"]["params"] == 8_030_261_248
        assert not est["ddp"]["fits"]  # bf16 params + grads + AdamW states of 8B do not fit in 80 GB
        assert est["zero3"]["fits"]
        assert plan["recommended"] in ("zero2", "zero3")
        totals[nodes] = est["zero3"]["total_bytes"]
        assert est["zero3"]["eta_seconds"] == pytest.approx(1e9 / est["zero3"]["tokens_per_s"])  # 1 epoch
    assert totals[8] < totals[2] < totals[1]


def test_nothing_fits_exits_1_and_names_the_fix(capsys, llama_dir):
    rc = main(["plan", *_llama_args(llama_dir, "model.gradient_checkpointing=false", "loss.impl=hf"),
               "--nodes", "1", "--gpus-per-node", "1", "--gpu", "a10g"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "nothing fits" in out and "Fix:" in out


def test_gpu_mem_overrides_the_gpu_table(capsys, llama_dir):
    _, big = _plan_json(capsys, *_llama_args(llama_dir, "--gpus-per-node", "8", "--gpu-mem", "80GiB"))
    _, small = _plan_json(capsys, *_llama_args(llama_dir, "--gpus-per-node", "8", "--gpu-mem", "20GiB"))
    assert big["cluster"]["gpu_mem_bytes"] == 80 * 2**30
    assert {c["candidate"] for c in small["candidates"] if c["fits"]} < \
        {c["candidate"] for c in big["candidates"] if c["fits"]}


def test_dataset_tokens_are_estimated_from_the_configs_data(capsys):
    from distthink.config import load_config
    from distthink.data.dataset import build_sft_dataset
    from distthink.engine import batching as train_data
    from distthink.models.load import load_tokenizer

    rc, plan = _plan_json(capsys, "train.max_steps=0", "--sample-records", "100000")
    assert rc == 0
    cfg = load_config(None, ["train.max_steps=0"])
    samples, _ = build_sft_dataset(str(train_data.resolve_path("bundled", "train")), load_tokenizer(cfg),
                                   train_data.chat_policy(cfg), on_error="skip", audit=False)
    # Sampling every record: the estimate is the exact token count of an epoch.
    assert plan["dataset"]["dataset_tokens_used"] == pytest.approx(sum(len(s) for s in samples))
    est = plan["candidates"][0]
    assert est["eta_seconds"] == pytest.approx(plan["dataset"]["dataset_tokens_used"] / est["tokens_per_s"])


def test_bad_arguments_are_user_errors(capsys):
    assert main(["plan", "--gpu-mem", "lots"]) == 2
    assert "--gpu-mem" in capsys.readouterr().err
    assert main(["plan", "--hfu", "1.5"]) == 2
    assert main(["plan", "--candidates", "zero9"]) == 2
    assert main(["plan", "lora.r=0"]) == 2  # the training config's own validation


def test_parse_bytes_units():
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("80GB") == 80e9
    assert parse_bytes("40G") == 40e9
    assert parse_bytes("141e9") == 141e9
    assert parse_bytes("512MiB") == 512 * 2**20


def test_help_explains_the_model(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    out = capsys.readouterr().out
    for word in ("--nodes", "--gpus-per-node", "--gpu-mem", "--hfu", "--dataset-tokens", "--json", "ZeRO"):
        assert word in out
