"""The learning-rate schedule both training stages share (cosine decay, Loshchilov and Hutter 2017)."""

from __future__ import annotations

import keras


def learning_rate_schedule(peak: float, final_ratio: float, total_steps: int):
    """Cosine decay from `peak` to `peak * final_ratio` over `total_steps` (constant if ratio 1).

    The schedule reads the optimizer's iteration count, which the checkpoints keep, so a resumed
    run continues on the same curve.
    """
    if final_ratio >= 1.0:
        return peak
    return keras.optimizers.schedules.CosineDecay(
        peak, decay_steps=max(total_steps, 1), alpha=final_ratio
    )
