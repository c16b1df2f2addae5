"""bench/trainer_throughput.py's ratios: per interleaved round against that round's own baseline, then the median."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from trainer_throughput import summarize


def test_ratios_are_per_round_then_median() -> None:
    off, fast = ("off", 0, 0.0), ("async", 256, 0.0)
    # The machine slows down 2x between rounds; async is always 0.9x of that round's off.
    per_round = []
    for slow, ratio in ((1.0, 0.9), (2.0, 0.8), (4.0, 0.95)):
        per_round.append({off: (np.full(10, 0.1 * slow), 0, 0.0), fast: (np.full(10, 0.1 * slow / ratio), 5, 0.2)})
    rows = {r["mode"]: r for r in summarize([off, fast], per_round)}
    assert rows["off"]["ratio_to_off"] == 1.0 and rows["off"]["rounds"] == 3
    a = rows["async"]
    assert (a["ratio_to_off"], a["ratio_min"], a["ratio_max"]) == (0.9, 0.8, 0.95)  # not the ratio of pooled means
    assert a["steps_per_s"] == round(float(np.median([0.9 / 0.1, 0.8 / 0.2, 0.95 / 0.4])), 3)
    assert a["edits_applied"] == 5 and a["render_share"] == 0.2
