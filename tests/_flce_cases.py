"""A packed batch for the dynamic ("after </think>") weights, shared by the op's tests and the sequence-parallel ones.

Hidden states are crafted so that the argmax prediction is `</think>` exactly at chosen positions: the `</think>`
row of the lm_head is a long vector u; "hit" rows point along u, the others away from it."""

import torch

V, H, THINK = 512, 32, 7
LENGTHS = [14, 9, 20, 17]            # four packed samples, N = 60
PROMPT = [3, 2, 4, 1]                # leading positions of each sample that are not learned
# hits, as offsets inside each sample; (sample, offset) pairs
HITS = [(0, 1),                      # on a prompt position: outside the learned region, must not count
        (0, 6), (0, 10),             # two hits: the first one (6) decides
        (2, 18),                     # hit on the last learned position of the sample
        (3, 1)]                      # hit on the first learned position
ZERO_WEIGHT = [(2, 5)]               # a learned target with static weight 0 is outside the region
ZERO_WEIGHT_HIT = [(1, 4)]           # ...and a hit there does not count (sample 1 has no real hit)


def packed_case(seed=0, random_hits=False):
    g = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    weight = torch.randn(V, H, generator=g) * 0.5
    u = torch.randn(H, generator=g)
    u = u / u.norm()
    weight[THINK] = 10 * u if not random_hits else 8.5 * u
    hidden = torch.randn(n, H, generator=g)
    starts = [sum(LENGTHS[:i]) for i in range(len(LENGTHS))]
    if not random_hits:
        hidden = hidden - (hidden @ u)[:, None] * u - 2 * u          # think logit -20: never the argmax
        for s, off in HITS + ZERO_WEIGHT_HIT:
            hidden[starts[s] + off] = 3 * u + 0.1 * torch.randn(H, generator=g)
    position_ids = torch.cat([torch.arange(L) for L in LENGTHS])
    segment_ids = torch.cat([torch.full((L,), i) for i, L in enumerate(LENGTHS)])
    target = torch.randint(0, V, (n,), generator=g)
    weights = torch.rand(n, generator=g) + 0.5
    for s, (st, L) in enumerate(zip(starts, LENGTHS)):
        target[st:st + PROMPT[s]] = -100
        target[st + L - 1] = -100                                  # last position of a sample
    for s, off in ZERO_WEIGHT + ZERO_WEIGHT_HIT:
        weights[starts[s] + off] = 0.0
    weights[target == -100] = 0.0
    return hidden.requires_grad_(), weight.requires_grad_(), target, weights, position_ids, segment_ids
