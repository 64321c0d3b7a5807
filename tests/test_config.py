"""Config: embedded default, YAML + dotted overrides, refusal of unknown keys / wrong types / impossible
combinations with a message naming the key and the fix, and the generated reference doc."""

import pytest
import torch

from distthink.config import Config, config_from_dict, load_config, markdown_reference, parse_overrides
from distthink.errors import ConfigError


def test_embedded_default_is_the_tiny_cpu_run():
    cfg = load_config()
    assert cfg.model.from_config == "tiny-qwen3" and cfg.model.name_or_path is None
    assert cfg.model.tokenizer == "tiny" and cfg.data.train == "bundled" and cfg.data.eval == "bundled"
    assert cfg.distributed.deepspeed is None
    # library defaults of LoRA mirror the ThinkRec paper even though the demo run fine-tunes fully
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (8, 16, 0.05, ["q_proj", "v_proj"])


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 1e-4\n  max_steps: 7\nlora:\n  enabled: true\n  r: 4\n")
    cfg = load_config(f, ["lora.r=16", "lora.target_modules=[q_proj,k_proj]", "data.eval=null"])
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)  # YAML 1.1 '1e-4' is a str
    assert cfg.train.max_steps == 7 and cfg.lora.enabled is True and cfg.lora.r == 16
    assert cfg.lora.target_modules == ["q_proj", "k_proj"] and cfg.data.eval is None


@pytest.mark.parametrize("overrides, needle", [
    (["train.lrr=1e-4"], "unknown config key 'train.lrr'"),
    (["trian.lr=1"], "unknown config key 'trian'"),
    (["lora.r=true"], "'lora.r' must be an integer"),
    (["lora.r=abc"], "'lora.r' must be an integer"),
    (["train.lr=fast"], "'train.lr' must be a number"),
    (["batch.mode=rows"], "'batch.mode' = 'rows' is not one of"),
    (["model.name_or_path=Qwen/Qwen3-8B"], "model.name_or_path and model.from_config are both set"),
    (["model.from_config=null"], "neither model.name_or_path nor model.from_config"),
    (["batch.gradient_accumulation=0"], "'batch.gradient_accumulation' must be >= 1"),
    (["batch.max_tokens=100"], "batch.max_tokens (100) < data.max_length"),
    (["checkpoint.export=adapter", "lora.enabled=false"], "checkpoint.export=adapter needs lora.enabled=true"),
    (["distributed.deepspeed=/nope.json"], "distributed.deepspeed='/nope.json' does not exist"),
    (["train.device=cpu", "model.attn_implementation=flash_attention_2"], "flash_attention_2 needs a GPU"),
    (["checkpoint.resume=/nope"], "checkpoint.resume='/nope' does not exist"),
    (["lora"], "is not key=value"),
    (["train.cpu_threads=-1"], "'train.cpu_threads' must be >= 0"),
])
def test_refusals_name_the_key_and_the_fix(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    msg = str(err.value)
    assert needle in msg
    assert "Fix" in msg or "did you mean" in msg or "must" in msg


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        load_config(None, ["train.lrr=1"])


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_roundtrip_through_dict():
    cfg = load_config(None, ["train.max_steps=3", "lora.enabled=true"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg and isinstance(again, Config)


def test_parse_overrides_nested():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_reference_doc_lists_every_key():
    doc = markdown_reference()
    cfg = Config().to_dict()
    for section, values in cfg.items():
        for key in values:
            assert f"`{section}.{key}`" in doc


def test_docs_configuration_md_is_generated_from_the_dataclasses():
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text() == markdown_reference() + "\n", \
        "docs/configuration.md is stale: python -m distthink.config --markdown > docs/configuration.md"


def test_embedded_default_matches_configs_default_yaml():
    from pathlib import Path

    from distthink.config import default_yaml_text

    copy = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    assert copy.read_text() == default_yaml_text()


def test_every_shipped_config_loads():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "configs").glob("*.yaml"))
    assert len(files) >= 3
    cwd = Path.cwd()
    try:
        import os

        os.chdir(root)  # ds_configs/ paths are relative to the repository root
        for f in files:
            load_config(f)
    finally:
        os.chdir(cwd)


def test_mapping_overrides_merge_key_by_key(tmp_path):
    from distthink.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("task:\n  options:\n    a: 1\n    nested: {x: 1, y: 2}\ndata:\n  policy:\n    think: mask\n")
    cfg = load_config(path, ["task.options.b=2", "task.options.nested.y=3", "data.policy.think_weight=0.5"])
    assert cfg.task.options == {"a": 1, "b": 2, "nested": {"x": 1, "y": 3}}
    assert cfg.data.policy == {"think": "mask", "think_weight": 0.5}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("installed", [True, False])
@pytest.mark.parametrize("capability", [(7, 0), (8, 0), (9, 0)])
def test_auto_attention_is_flash_only_where_it_runs(device, dtype, installed, capability):
    """flash-attn 2 runs on CUDA only, in fp16/bf16 only, on sm >= 8.0, when installed; sdpa everywhere else. An
    explicit flash_attention_2 where it cannot run is refused before any model is built, with the reason."""
    from distthink.config import resolve_attention

    runs = device == "cuda" and dtype != torch.float32 and installed and capability >= (8, 0)
    kw = dict(installed=installed, capability=capability)
    assert resolve_attention("auto", device, dtype, **kw) == ("flash_attention_2" if runs else "sdpa")
    assert resolve_attention("sdpa", device, dtype, **kw) == "sdpa"
    assert resolve_attention("eager", device, dtype, **kw) == "eager"
    if runs:
        assert resolve_attention("flash_attention_2", device, dtype, **kw) == "flash_attention_2"
    else:
        with pytest.raises(ConfigError, match="cannot run here: .*Fix"):
            resolve_attention("flash_attention_2", device, dtype, **kw)


@pytest.mark.parametrize("overrides, compute", [
    (["lora.enabled=false"], torch.bfloat16),                                     # fp32 weights under bf16 autocast
    (["lora.enabled=true"], torch.bfloat16),                                      # bf16 base, fp32 adapters
    (["lora.enabled=false", "model.dtype=float32"], torch.float32),               # an explicit fp32 GPU run
    (["lora.enabled=false", "distributed.deepspeed=ds_configs/zero3.json"], torch.bfloat16)])
def test_the_attention_follows_the_compute_dtype_not_the_parameter_dtype(overrides, compute):
    """What the trainer asks (train.py: load_model(..., param_dtype, compute_dtype=resolve_dtype)) on a GPU with
    flash-attn: autocast runs of fp32 weights compute in bf16 and get flash-attn; an fp32 run gets sdpa."""
    from distthink.config import resolve_attention, resolve_dtype

    cfg = load_config(None, overrides)
    assert resolve_dtype(cfg, "cuda") == compute  # dtype auto = bf16 on cuda
    attn = resolve_attention(cfg.model.attn_implementation, "cuda", resolve_dtype(cfg, "cuda"), installed=True,
                             capability=(9, 0))
    assert attn == ("flash_attention_2" if compute != torch.float32 else "sdpa")


def test_device_and_dtype_settings_outside_training():
    from distthink.config import device_for, dtype_for

    assert dtype_for("auto", "cuda") == torch.bfloat16 and dtype_for("auto", "cpu") == torch.float32
    assert dtype_for("float16", "cpu") == torch.float16
    assert device_for("cpu") == "cpu"
    if not torch.cuda.is_available():
        assert device_for("auto") == "cpu"
        with pytest.raises(ConfigError, match="--device=cuda but no CUDA device.*Fix: use --device=cpu"):
            device_for("cuda", "--device")
