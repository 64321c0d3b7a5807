"""The op on a real (tiny) Qwen3 from transformers: same loss and gradients as the model's own loss path.

This is how the trainer calls it: decoder hidden states + lm_head weight + the batch contract's shifted
targets; HF's loss (mean CE over non-ignored labels, shifted inside the model) is the reference.
"""

import pytest
import torch
from _tolerance import TINY_DECODER_K, fp_tol
from test_flce import close

from distthink.ops import fused_linear_cross_entropy


def tiny_qwen3(tied: bool):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=tied,
                      max_position_embeddings=128)
    return Qwen3ForCausalLM(cfg).float().eval()


@pytest.mark.parametrize("tied", [False, True])
def test_matches_hf_loss_and_gradients(tied):
    model = tiny_qwen3(tied)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 512, (2, 24), generator=g)
    labels = input_ids.clone()
    labels[:, :7] = -100                                   # prompt
    # batch contract: targets[t] = labels[t + 1], -100 at the end of each row
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]

    model.zero_grad()
    hf_loss = model(input_ids=input_ids, labels=labels).loss
    hf_loss.backward()
    hf_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
    n_learned = int((targets != -100).sum())
    loss = fused_linear_cross_entropy(hidden, model.get_output_embeddings().weight, targets,
                                      normalizer=n_learned, chunk_size=8)
    loss.backward()
    close(loss, hf_loss)
    # the loss gradients (vocabulary 512) differ in fp32 and go back through the decoder: its forward + backward chain
    rtol = fp_tol(torch.float32, 1.0, k=2 * TINY_DECODER_K)
    for p, want in zip(model.parameters(), hf_grads):
        close(p.grad, want, rtol)
