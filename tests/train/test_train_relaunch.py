"""Relaunching into an output dir that already holds a run (issue: what a new user hit on a fresh machine):
- a relaunch whose run means something else (model, data bytes, seed, LoRA shape, ...) is refused at start-up
  with exit 2 naming the keys, unless checkpoint.allow_config_change=true; harmless changes pass with one line;
- the summary describes the whole run (cumulative time and tokens from the trainer state) and this launch
  separately, also after resuming and after relaunching a finished run;
- the final evaluation reaches TensorBoard at the last step, and a relaunch adds no new hyperparameter folder."""

import json
import shutil

import pytest
from _train_utils import FAST, launch, summary

from distthink.engine.resume_guard import config_changes
from distthink.resources import ASSETS

RUN = [*FAST, "train.max_steps=4", "checkpoint.every_steps=2", "batch.max_tokens=1024"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 4-step run, checkpointed at steps 2 and 4, copied per test so each test may relaunch into it."""
    out = tmp_path_factory.mktemp("relaunch") / "run"
    launch([*RUN, f"train.output_dir={out}"])
    return out


def _copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def test_config_changes_are_sorted_into_meaningful_and_harmless():
    old = {"model": {"from_config": "tiny-qwen3"}, "train": {"seed": 1, "max_steps": 4, "lr": 1e-3},
           "data": {"train": "a.jsonl", "policy": {"think": "supervise"}}, "logging": {"every_steps": 1},
           "checkpoint": {"resume": "auto"}}
    new = json.loads(json.dumps(old))
    new["train"].update(seed=2, max_steps=8)
    new["data"]["policy"] = {"think": "mask"}
    new["logging"]["every_steps"] = 5
    new["checkpoint"]["resume"] = "never"  # about this launch only: never reported
    meaningful, harmless = config_changes(old, new)
    assert meaningful == ["data.policy", "train.seed"]
    assert harmless == ["logging.every_steps", "train.max_steps"]


@pytest.mark.slow
@pytest.mark.parametrize("change", [["train.seed=7"], ["lora.r=4"], ["data.max_length=512"],
                                    ["model.config_overrides={num_hidden_layers: 1}"]])
def test_a_relaunch_that_means_another_run_is_refused(finished, tmp_path, change):
    out = _copy(finished, tmp_path)
    proc = launch([*RUN, f"train.output_dir={out}", "train.max_steps=6", *change], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "holds a checkpoint of a different run" in last and change[0].split("=")[0] in last
    assert "Fix: use a new train.output_dir" in last and "allow_config_change" in last
    assert summary(out)["steps"] == 4  # nothing of the old run was touched


@pytest.mark.slow
def test_changed_data_bytes_are_refused_and_allow_config_change_resumes(tmp_path):
    data = tmp_path / "train.jsonl"
    shutil.copy(ASSETS / "sample_sft.jsonl", data)
    out = tmp_path / "run"
    launch([*RUN, f"train.output_dir={out}", f"data.train={data}"])
    with open(data, "a") as fh:  # one more record: the same path, other bytes
        fh.write(data.read_text().splitlines()[0] + "\n")
    proc = launch([*RUN, f"train.output_dir={out}", f"data.train={data}", "train.max_steps=6"], check=False)
    assert proc.returncode == 2 and "the file's content changed" in proc.stderr.strip().splitlines()[-1]
    proc = launch([*RUN, f"train.output_dir={out}", f"data.train={data}", "train.max_steps=6",
                   "checkpoint.allow_config_change=true"])
    assert summary(out)["steps"] == 6 and "although data.train" in proc.stderr


@pytest.mark.slow
def test_resumed_summary_describes_the_whole_run_and_this_launch(finished, tmp_path):
    out = _copy(finished, tmp_path)
    first = summary(out)
    proc = launch([*RUN, f"train.output_dir={out}", "train.max_steps=6", "logging.every_steps=2"])
    assert "changed settings: logging.every_steps 1 -> 2, train.max_steps 4 -> 6" in proc.stderr
    s = summary(out)
    launch_part = s["this_launch"]
    assert s["steps"] == 6 and launch_part["steps"] == 2 and launch_part["resumed_from"].endswith("step-00000004")
    assert s["tokens"] == first["tokens"] + launch_part["tokens"]
    assert s["learned_tokens"] == first["learned_tokens"] + launch_part["learned_tokens"]
    assert s["train_time_s"] == pytest.approx(first["train_time_s"] + launch_part["train_time_s"], abs=2e-3)
    assert s["learned_tokens"] <= s["tokens"] and s["learned_tokens_per_s"] <= s["tokens_per_s"]
    # relaunching the finished run: the whole-run figures stay, this launch did nothing
    launch([*RUN, f"train.output_dir={out}", "train.max_steps=6"])
    again = summary(out)
    assert again["this_launch"]["steps"] == 0 and again["this_launch"]["tokens_per_s"] is None
    for key in ("tokens", "learned_tokens", "train_time_s", "tokens_per_s", "learned_tokens_per_s"):
        assert again[key] == s[key], key


@pytest.mark.slow
def test_final_eval_reaches_tensorboard_and_a_relaunch_adds_no_hparams_folder(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb_run"
    args = [*RUN, f"train.output_dir={out}", "logging.tensorboard=true", "data.eval=bundled",
            "eval.every_steps=2"]
    tb = out / "tb"

    def hparam_dirs():  # TensorBoard's add_hparams writes into a new folder named by the time
        return {d for d in tb.rglob("*") if d.is_dir() and d.name.replace(".", "").isdigit()}

    launch(args)
    first = hparam_dirs()
    launch(args + ["train.max_steps=6"])
    scalars = {}
    for events in tb.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, set()).update(e.step for e in acc.Scalars(tag))
    assert {2, 4, 6} <= scalars["eval_loss"], scalars.get("eval_loss")  # 4 and 6: the two final evaluations
    assert first and hparam_dirs() == first  # the relaunch (same run) stored no second set of hyperparameters
