"""The example task of docs/architecture.md runs as written, through the engine, and computes what it claims:
the mean over samples of each sample's weighted mean token loss (checked against per-sample forwards in float64;
plain token-weighted SFT, the leaky variant for this claim, gives another number)."""

import re
import sys

import torch
from _tolerance import TINY_DECODER_K, fp_tol

from distthink.config import load_config
from distthink.engine import batching
from distthink.engine.task import make_task
from distthink.models.load import load_model, load_tokenizer
from distthink.resources import PACKAGE_DIR

DOC = PACKAGE_DIR.parent / "docs" / "architecture.md"


def _example_module(tmp_path):
    text = DOC.read_text().split("## A new task", 1)[1]
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "sample_mean_example.py").write_text(code)
    sys.path.insert(0, str(tmp_path))
    return "sample_mean_example:SampleMeanSFTTask"


def _reference(model, samples) -> float:
    """mean over samples with a learned token of sum_t w_t CE_t / sum_t w_t, one unpacked forward each."""
    per_sample = []
    for s in samples:
        ids = torch.tensor([s.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        targets = torch.tensor(s.labels[1:])
        w = torch.tensor(s.loss_weights[1:], dtype=torch.float64)
        keep = targets != -100
        ce = -logp[:-1][keep].gather(1, targets[keep, None]).squeeze(1)
        if w[keep].sum() > 0:
            per_sample.append(float((ce * w[keep]).sum() / w[keep].sum()))
    return sum(per_sample) / len(per_sample)


def test_the_documented_example_task_is_a_mean_over_samples(tmp_path):
    cfg = load_config(None, [f"task.name={_example_module(tmp_path)}", "lora.enabled=false"])
    task = make_task(cfg)
    tok = load_tokenizer(cfg)
    task.prepare_tokenizer(tok)
    samples = [s for _, s in zip(range(6), batching.load_split(cfg, task, "train", tok))]
    model = load_model(cfg, tok, "cpu", torch.float32).eval()
    with torch.no_grad():  # sharpen the random model's logits, so that token losses differ between samples
        model.get_output_embeddings().weight.mul_(30)
    wrapped = task.wrap_model(model, tok)
    batch = task.collator(tok)(samples)
    with torch.no_grad():
        loss = float(task.forward(wrapped, batch, "sdpa", torch.float32)["lm"]) / task.norms(batch)["lm"]
    ref = _reference(model, samples)
    tol = fp_tol(torch.float32, abs(ref), k=TINY_DECODER_K)  # one fp32 decoder pass vs a float64 log-softmax
    assert abs(loss - ref) < tol, (loss, ref)
    # the leaky variant of the claim: plain SFT weighs every token equally, so long samples count more
    plain = batching.make_collator(cfg, tok)(samples)
    with torch.no_grad():
        token_mean = float(task.forward(wrapped, plain, "sdpa", torch.float32)["lm"]) / plain["target_weight_sum"]
    assert abs(token_mean - ref) > 100 * tol, (token_mean, ref)
