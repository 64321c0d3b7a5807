"""`distthink plan` without a network: the architecture configs of the models the shipped configs name come with
distthink, are used when the hub is offline or does not answer (at once, no retries), and by --model-config.

The shipped numbers are checked against the published model sizes (model cards: Qwen3-8B 8.2 B parameters,
6.95 B without embeddings; Qwen3-1.7B 1.7 B, 1.4 B without embeddings; Llama-3.1-8B 8,030,261,248) and against
the parameter count of the real transformers model built from them on the meta device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from _train_utils import ROOT, free_port
from transformers import AutoConfig, AutoModelForCausalLM

from distthink.cli import main
from distthink.launch import model_configs
from distthink.launch.plan import ModelShape

QWEN3_8B_PARAMS = 8_190_735_360


def _config(name):
    d = model_configs.load(name)
    return AutoConfig.for_model(d.pop("model_type"), **d)


def _rounded_like(value: float, card: str) -> bool:
    """value (parameters) printed in billions with as many decimals as the model card's figure equals it."""
    decimals = len(card.split(".")[1]) if "." in card else 0
    return f"{value / 1e9:.{decimals}f}" == card


@pytest.mark.parametrize("name,total,non_embedding", [
    ("Qwen3-8B", "8.2", "6.95"), ("Qwen3-1.7B", "1.7", "1.4"),
    ("Llama-3.1-8B", 8_030_261_248, None), ("Llama-3.1-8B-Instruct", 8_030_261_248, None)])
def test_shipped_configs_are_the_published_models(name, total, non_embedding):
    cfg = _config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    real = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    assert ModelShape.from_hf_config(cfg).num_params == real
    if non_embedding is None:
        assert real == total
    else:
        embeddings = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
        assert _rounded_like(real, total) and _rounded_like(real - embeddings, non_embedding)


def test_every_shipped_config_is_package_data_and_found_by_hub_id():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"launch/model_configs/*.json"' in pyproject
    assert set(model_configs.names()) == {"Qwen3-8B", "Qwen3-1.7B", "Llama-3.1-8B", "Llama-3.1-8B-Instruct"}
    assert model_configs.load("Qwen/Qwen3-8B")["num_hidden_layers"] == 36
    assert model_configs.load("meta-llama/Meta-Llama-3.1-8B-Instruct")["eos_token_id"] == [128001, 128008, 128009]
    assert model_configs.load("Qwen/Qwen3-8B-Base") is None  # not shipped: no guessing from similar names


def test_shipped_8b_config_plans_offline(capsys):
    """HF_HUB_OFFLINE=1 (tests/conftest.py) and the model not in the cache: the shipped config.json is used."""
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    rc = main(["plan", "--config", str(ROOT / "configs" / "qwen3_8b_lora_zero3.yaml"), "--dataset-tokens", "1e8",
               "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert plan["model"]["params"] == QWEN3_8B_PARAMS
    assert "shipped with distthink" in plan["model"]["source"] and "offline" in plan["model"]["source"]
    # the planner's choice and the config's differ, and the plan says how (the config explains why)
    assert plan["recommended"] == "ddp" and plan["configured"] == "zero3"
    assert "this config uses zero3: fits" in plan["message"]
    assert "recommends DDP" in (ROOT / "configs" / "qwen3_8b_lora_zero3.yaml").read_text()


def test_unreachable_hub_falls_back_at_once():
    """Not in offline mode, but the hub endpoint refuses connections: one request, then the shipped config. The
    hub client's own lookup would retry for ~25 s ("Retrying in 8s [Retry 5/5]") and then fail."""
    env = dict(os.environ, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{free_port()}",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "distthink", "plan", "--config", "configs/qwen3_8b_lora_zero3.yaml",
                           "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Retry" not in proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["model"]["params"] == QWEN3_8B_PARAMS and "the hub does not answer" in plan["model"]["source"]
    assert "not in the local cache" in plan["dataset"]["error"]  # no ETA without the tokenizer, said plainly


def test_model_config_option(capsys, tmp_path):
    rc = main(["plan", "--model-config", "Qwen3-1.7B", "--dataset-tokens", "1e8", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0 and plan["model"]["params"] == 1_720_574_976 and plan["model"]["layers"] == 28
    path = tmp_path / "config.json"
    path.write_text(json.dumps(model_configs.load("Llama-3.1-8B")))
    rc = main(["plan", "--model-config", str(tmp_path), "--dataset-tokens", "1e8", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 0 and plan["model"]["params"] == 8_030_261_248 and plan["model"]["source"] == str(path)
    assert main(["plan", "--model-config", "Qwen3-9B"]) == 2
    err = capsys.readouterr().err
    assert "Fix:" in err and "Qwen3-8B" in err
