"""`distthink plan`'s memory estimate against the measured peak of real training runs (CPU, gloo).

Each case runs the real recipe (benchmarks/plan_validation.py: `distthink.train.run` under a live-tensor
tracker, the CPU analogue of torch.cuda.max_memory_allocated) and fails when the estimate of the same
config drifts more than TOLERANCE from the measured per-rank peak. The full matrix (ZeRO-3 full,
checkpointing, plain loss, ...) is `python benchmarks/plan_validation.py`.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import plan_validation as pv  # noqa: E402

TOLERANCE = 0.10  # measured worst case over the benchmark matrix: 5% (docs/scaling.md)


def test_tracker_counts_live_storages_once_and_their_peak():
    tracker = pv._make_tracker()
    with tracker:
        a = torch.empty(1_000_000)  # 4 MB
        view = a[10:]  # a view: same storage, not counted again
        b = torch.zeros(500_000, dtype=torch.float64)  # 4 MB
        peak_both = tracker.live
        c = b.clone()  # 4 MB more: 12 MB live, the peak
        del a, view
        after_free = tracker.live
        b.untyped_storage().resize_(0)  # storage freed in place: its bytes leave the live total
        after_resize = tracker.live
        c.resize_(1_000_000)  # aten::resize_ grows the storage to 8 MB
        after_grow = tracker.live
        del c
    assert peak_both >= 8_000_000 and peak_both < 8_100_000
    assert after_free == pytest.approx(8_000_000, abs=50_000)
    assert after_resize == pytest.approx(4_000_000, abs=50_000)
    assert after_grow == pytest.approx(8_000_000, abs=50_000)
    assert tracker.peak == pytest.approx(12_000_000, abs=100_000)


CASES = ["tiny_1r_plain_full", "small_1r_plain_full_bf16", "small_2r_zero2_lora_bf16", "small_2r_zero3_full",
         # sequence parallelism: the same 2048-token packed rows at SP 1 and SP 2 (the activation estimate)
         "small_2r_zero3_full_long", "small_2r_zero3_full_long_sp2"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_estimate_within_tolerance_of_measured_peak(name, tmp_path):
    row = pv.compare(pv.measure(name, str(tmp_path)))
    assert row["measured_peak_MiB"] > 1
    assert abs(row["ratio"] - 1) <= TOLERANCE, row
