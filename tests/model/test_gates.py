"""Tests of the hard-concrete head gate against its formulas (docs/method.md §2)."""

import math

import pytest
import torch

from lightning_modules.model.gates import HardConcreteGate


def test_training_gates_are_exact_zeros_and_ones_open_with_probability_sigmoid_log_alpha():
    torch.manual_seed(0)
    levels = torch.tensor([-2.0, -0.5, 0.0, 1.0, 2.5])
    draws = 8000
    gate = HardConcreteGate(levels.numel() * draws)
    with torch.no_grad():
        gate.log_alpha.copy_(levels.repeat_interleave(draws))
    g = gate.train()()
    assert set(g.unique().tolist()) <= {0.0, 1.0}
    p_open = g.detach().view(levels.numel(), draws).mean(1)
    expected = torch.sigmoid(levels)
    tolerance = 4 * (expected * (1 - expected) / draws).sqrt()  # 4 standard errors
    assert ((p_open - expected).abs() < tolerance).all(), (p_open, expected)


def test_straight_through_gradient_reaches_log_alpha():
    torch.manual_seed(0)
    gate = HardConcreteGate(64, init=0.0)
    gate.train()().sum().backward()
    assert gate.log_alpha.grad is not None and gate.log_alpha.grad.abs().sum() > 0


def test_eval_gate_is_deterministic_and_open_iff_log_alpha_non_negative():
    gate = HardConcreteGate(5).eval()
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-1.0, -1e-4, 0.0, 0.3, 2.0]))
    expected = [0.0, 0.0, 1.0, 1.0, 1.0]
    assert gate().tolist() == expected == gate().tolist()
    assert gate.keep_mask().tolist() == [False, False, True, True, True]


@pytest.mark.parametrize("beta, gamma, zeta", [(0.333, -0.1, 1.1), (0.667, -0.2, 1.3)])
def test_l0_term_equals_its_closed_form(beta, gamma, zeta):
    gate = HardConcreteGate(4, beta=beta, gamma=gamma, zeta=zeta)
    values = [-3.0, 0.0, 1.0, 2.0]
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor(values))
    expected = sum(1 / (1 + math.exp(-(a - beta * math.log(-gamma / zeta)))) for a in values)
    assert gate.l0().item() == pytest.approx(expected, rel=1e-6)
    # docs/method.md §2: at the default init 2.0 each term is sigmoid(2.80) = 0.943
    assert HardConcreteGate(8).l0().item() / 8 == pytest.approx(0.94259, abs=1e-5)  # sigmoid(2 + 0.7985)


def test_open_probability_is_sigmoid_of_log_alpha():
    gate = HardConcreteGate(3, init=0.7)
    torch.testing.assert_close(gate.open_probability(), torch.sigmoid(torch.full((3,), 0.7)))


def test_bad_gate_settings_are_rejected():
    with pytest.raises(ValueError, match="beta > 0"):
        HardConcreteGate(4, beta=0.0)
    with pytest.raises(ValueError, match="gamma < 0"):
        HardConcreteGate(4, gamma=0.1)


def test_non_default_stretch_keeps_the_eval_decision_and_training_probability_consistent():
    torch.manual_seed(0)
    gate = HardConcreteGate(6, zeta=1.5)  # gamma + zeta != 1: the gate opens at log_alpha = threshold, not 0
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-2.0, -0.6, -0.4, 0.0, 0.5, 2.0]))
    assert gate.threshold == pytest.approx(math.log(0.375 / 0.625))
    assert gate.eval()().bool().tolist() == gate.keep_mask().tolist() == [False, False, True, True, True, True]
    draws = 20000
    sampled = HardConcreteGate(2 * draws, zeta=1.5)
    with torch.no_grad():
        sampled.log_alpha.copy_(torch.tensor([-1.0, 0.5]).repeat_interleave(draws))
    p_open = sampled.train()().detach().view(2, draws).mean(1)
    expected = sampled.open_probability().detach().view(2, draws)[:, 0]
    assert ((p_open - expected).abs() < 4 * (expected * (1 - expected) / draws).sqrt()).all()
