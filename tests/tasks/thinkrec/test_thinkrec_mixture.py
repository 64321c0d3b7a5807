"""ThinkRec's data mixture as the paper runs it (train_splits [reason, train], train_ratios [0.2, 0.8]), through the
engine's mixture: the prepared train split twice, once as the reasoning set (options.reason_ratio 1.0: every row
with a reason is a reasoning sample) and once as the recommendation set (0.0: label-only), drawn 0.2 / 0.8."""

import math

import numpy as np
import pandas as pd
import pytest

from distthink.config import load_config
from distthink.engine import batching
from distthink.engine.task import make_task
from distthink.errors import ConfigError
from distthink.models.load import load_tokenizer
from distthink.tasks.thinkrec.synthetic_world import prepare_synthetic


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep")
    prepare_synthetic(out, reasons="template", n_users=40, n_items=60, min_per_user=10, max_per_user=20)
    return out


def _cfg(prep, *extra):
    train = prep / "train.parquet"
    return load_config("configs/thinkrec/smoke.yaml", [
        f'data.train=[{{path: "{train}", weight: 0.2, name: reason, options: {{reason_ratio: 1.0}}}}, '
        f'{{path: "{train}", weight: 0.8, name: train, options: {{reason_ratio: 0.0}}}}]',
        "data.eval=null", "logging.progress=false", *extra])


def test_the_seed_mixture_draws_one_fifth_reasoning_samples(prep):
    cfg = _cfg(prep)
    task, tok = make_task(cfg), load_tokenizer(cfg)
    task.prepare_tokenizer(tok)
    data = batching.load_split(cfg, task, "train", tok)
    assert data.names == ["reason", "train"]
    kinds = [np.asarray([p[i].meta["rec_type"] for i in range(len(p))]) for p in data.parts]
    assert (kinds[0] == "reasoning").all() and (kinds[1] == "label").all()  # every row has a template reason
    # the share of reasoning samples among the draws of 5 epochs: 0.2 within 3 sigma of a binomial
    draws = np.concatenate([data.epoch_indices(cfg.train.seed, e) for e in range(5)])
    share = float((data.source_ids[draws] == 0).mean())
    assert abs(share - 0.2) < 3 * math.sqrt(0.2 * 0.8 / len(draws)), share
    # the reasoning set overlaps the recommendation set: every row is in both (a reasoning row keeps its label-only
    # copy), which the per-row rule of one split (reason_ratio 0.2) does not give: there a reasoning row has none
    rows = min(len(pd.read_parquet(prep / "train.parquet")), cfg.data.max_train_samples)  # the smoke config's limit
    assert len(data.parts[0]) == len(data.parts[1]) == rows
    single = load_config("configs/thinkrec/smoke.yaml", [f"data.train={prep / 'train.parquet'}", "data.eval=null",
                                                         "logging.progress=false"])
    per_row = batching.load_split(single, make_task(single), "train", tok)
    labels = sum(per_row[i].meta["rec_type"] == "label" for i in range(len(per_row)))
    assert len(per_row) == rows and labels < rows


def test_source_options_are_checked_at_start_up(prep):
    with pytest.raises(ConfigError, match=r"options.reason_ratio=1.5 must be a number in \[0, 1\].*Fix"):
        cfg = _cfg(prep)
        cfg.data.train[0]["options"]["reason_ratio"] = 1.5
        task, tok = make_task(cfg), load_tokenizer(cfg)
        task.prepare_tokenizer(tok)
        batching.load_split(cfg, task, "train", tok)
    cfg = _cfg(prep)
    cfg.data.train[1]["options"] = {"reason_rate": 0.0}
    with pytest.raises(ConfigError, match=r"\['reason_rate'\] are not options of a source.*Fix: use \['reason_ratio'\]"):
        make_task(cfg)
    sft = load_config(None, ['data.train=[{path: a.jsonl, options: {reason_ratio: 1.0}}]'])
    with pytest.raises(ConfigError, match="Fix: remove `options` \\(this task takes none\\)"):
        make_task(sft)
