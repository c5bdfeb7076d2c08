"""The sparsity warm-up schedule (docs/method.md §3.1) and the callback's argument checks."""

import pytest
import pytorch_lightning as pl

from callbacks.head_pruning import HeadPruning
from callbacks.schedules import linear_ramp


def test_l0_weight_follows_the_paper_warmup_formula():
    callback = HeadPruning(l0_coefficient=0.02, start_step=10, warmup_steps=100)
    assert callback.current_l0_weight(9) == 0.0
    assert callback.current_l0_weight(10) == pytest.approx(0.02 * 1 / 100)  # lambda * (t - t_start + 1) / t_warm
    assert callback.current_l0_weight(59) == pytest.approx(0.02 * 50 / 100)
    assert callback.current_l0_weight(109) == pytest.approx(0.02)
    assert callback.current_l0_weight(5000) == pytest.approx(0.02)
    assert linear_ramp(3, 3, 0) == 1.0 and linear_ramp(2, 3, 0) == 0.0


def test_target_and_temperature_ramps():
    callback = HeadPruning(target_sparsity=0.4, warmup_steps=10, temperature_start=1.0, temperature_steps=20)
    assert callback.current_target(0) == pytest.approx(0.04)
    assert callback.current_target(50) == pytest.approx(0.4)
    assert callback.current_temperature(0, final=0.333) == pytest.approx(1.0)
    assert callback.current_temperature(10, final=0.333) == pytest.approx((1.0 + 0.333) / 2)
    assert callback.current_temperature(99, final=0.333) == pytest.approx(0.333)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of l0_coefficient"),
    ({"l0_coefficient": 0.01, "target_sparsity": 0.5}, "exactly one of l0_coefficient"),
    ({"target_sparsity": 1.0}, r"target_sparsity must be in \(0, 1\)"),
    ({"target_sparsity": 0.0}, r"target_sparsity must be in \(0, 1\)"),
    ({"l0_coefficient": -1.0}, "l0_coefficient must be >= 0"),
    ({"l0_coefficient": 0.01, "warmup_steps": -1}, "warmup_steps must be >= 0"),
    ({"l0_coefficient": 0.01, "prune_every_n_steps": 0}, "prune_every_n_steps must be >= 1"),
])
def test_bad_callback_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HeadPruning(**kwargs)


def test_spawned_ddp_is_rejected_with_the_fix_in_the_message():
    from lightning_modules.training.language_model import LanguageModel
    from tests.training.test_language_model import tiny_model

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    with pytest.raises(ValueError, match=r"--trainer.strategy=ddp"):
        HeadPruning(target_sparsity=0.5).setup(trainer, LanguageModel(tiny_model()), "fit")
