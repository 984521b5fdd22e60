"""The LR schedule against a hand formula, and the step convention of a real mlx AdamW."""

import math

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest

from forge_mlx.errors import ForgeError
from forge_mlx.schedule import lr_at, mlx_schedule

SCHED = dict(peak_lr=1.0, total_steps=6, warmup_steps=2, min_lr_ratio=0.1)
# Hand-computed: warmup 0, 1/2, 1; cosine over 4 steps from 1 to 0.1; flat 0.1 after total_steps.
HAND = [
    0.0,
    0.5,
    1.0,
    0.1 + 0.45 * (1 + math.cos(math.pi / 4)),
    0.55,
    0.1 + 0.45 * (1 + math.cos(3 * math.pi / 4)),
    0.1,
    0.1,
    0.1,
]


def test_lr_at_matches_hand_values():
    # float64 throughout: only rounding differences of cos at 1e-15 scale.
    assert [lr_at(s, **SCHED) for s in range(len(HAND))] == pytest.approx(HAND, abs=1e-12)


def test_lr_at_without_warmup_starts_at_peak_and_decays_to_zero():
    kw = dict(peak_lr=3e-4, total_steps=10, warmup_steps=0)
    assert lr_at(0, **kw) == 3e-4
    assert lr_at(5, **kw) == pytest.approx(1.5e-4, rel=1e-12)  # cos(pi/2) = 0: halfway
    assert lr_at(10, **kw) == 0.0 and lr_at(50, **kw) == 0.0


@pytest.mark.parametrize("warmup", [0, 3, 9])
def test_mlx_schedule_equals_lr_at_every_step(warmup):
    kw = dict(peak_lr=2e-4, total_steps=10, warmup_steps=warmup, min_lr_ratio=0.05)
    schedule = mlx_schedule(**kw)
    # The optimizer passes a uint64 step; the table is fp32, so 1e-6 relative (fp32 eps 1.2e-7) bounds it.
    got = [schedule(mx.array(s, dtype=mx.uint64)).item() for s in range(14)]
    assert got == pytest.approx([lr_at(s, **kw) for s in range(14)], rel=1e-6, abs=1e-12)


def test_adamw_uses_lr_at_of_the_step_count_before_the_update():
    kw = dict(peak_lr=0.1, total_steps=6, warmup_steps=2, min_lr_ratio=0.1)
    g = np.array([0.3, -1.2, 2.0], dtype=np.float32)
    opt = optim.AdamW(learning_rate=mlx_schedule(**kw), weight_decay=0.01)
    params = {"w": mx.array([1.0, -2.0, 0.5])}
    # Independent numpy AdamW (decoupled decay, no bias correction: mlx defaults), lr_at(k) for update k.
    p, m, v, b1, b2, eps, wd = np.array([1.0, -2.0, 0.5]), 0.0, 0.0, 0.9, 0.999, 1e-8, 0.01
    for k in range(9):
        params = opt.apply_gradients({"w": mx.array(g)}, params)
        mx.eval(params, opt.state)
        lr = lr_at(k, **kw)
        p = p * (1 - lr * wd)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
        p = p - lr * m / (np.sqrt(v) + eps)
        assert opt.step.item() == k + 1
        assert opt.learning_rate.item() == pytest.approx(lr, rel=1e-6)  # fp32 table
        # fp32 parameter arithmetic over 9 updates of size <= 0.1: 1e-6 absolute.
        np.testing.assert_allclose(np.array(params["w"]), p, atol=1e-6)
        if k == 0:
            np.testing.assert_array_equal(np.array(params["w"]), [1.0, -2.0, 0.5])  # warmup starts at lr 0


@pytest.mark.parametrize(
    "bad",
    [dict(total_steps=5, warmup_steps=5), dict(total_steps=0, warmup_steps=0), dict(warmup_steps=-1)],
)
def test_impossible_schedules_are_user_errors(bad):
    kw = dict(peak_lr=1e-4, total_steps=10, warmup_steps=2) | bad
    with pytest.raises(ForgeError, match="warmup_steps"):
        lr_at(0, **kw)


def test_min_lr_ratio_out_of_range_is_a_user_error():
    with pytest.raises(ForgeError, match="min_lr_ratio"):
        mlx_schedule(peak_lr=1e-4, total_steps=10, warmup_steps=2, min_lr_ratio=1.5)
