"""Tests of the model's pruning API: gating, physical head removal and optimizer-state slicing."""

import pytest
import torch

from callbacks.head_map import REMOVED_RGB, SHUT_RGB, head_map_image, head_map_rows
from lightning_modules.model.slicing import slice_optimizer_state_
from tests.model.test_model import LAYER_TYPES, V, randomize_, small_model


def gated_model(layer_type: str, output_scaling: bool, closed: dict[int, list[int]]):
    """A randomised double-precision model with gates on and the heads ``closed`` shut (log_alpha < 0)."""
    torch.manual_seed(0)
    model = small_model(layer_type=layer_type, output_scaling=output_scaling).double()
    randomize_(model, std=0.2)
    with torch.no_grad():
        for layer in model.layers:
            layer.gate.log_alpha.uniform_(0.1, 3.0)
        for layer_idx, heads in closed.items():
            model.layers[layer_idx].gate.log_alpha[heads] = -1.0
    model.gates_enabled = True
    return model.eval()


def two_segments(model, x):
    """Log-probabilities of two consecutive segments through the memory, and the final memory."""
    first = model(x[:, :8])
    second = model(x[:, 8:], memory=first.memory)
    return torch.cat([first.log_probs, second.log_probs], 1), second.memory


def removed_parameters_per_head(model) -> int:
    """Parameters one head owns: q/k/v/r rows, W_o columns, u and v', persistent K/V, its gate."""
    c = model.config
    n_persistent = c.n_persistent if c.layer_type == "all_attention" else 0
    return 5 * c.d_model * c.d_head + 2 * c.d_head + 2 * n_persistent * c.d_head + 1


def test_gates_disabled_is_the_dense_model_bit_for_bit():
    torch.manual_seed(0)
    model = small_model()
    randomize_(model)
    model.eval()
    x = torch.randint(0, V, (2, 8))
    dense = model(x).log_probs
    with torch.no_grad():
        model.layers[0].gate.log_alpha.fill_(-5.0)  # ignored while gates are off
    assert torch.equal(model(x).log_probs, dense)
    assert not any(layer.gate.log_alpha.requires_grad for layer in model.layers)
    with torch.no_grad():
        for layer in model.layers:
            layer.gate.log_alpha.fill_(2.0)
    model.gates_enabled = True  # all gates open in eval: multiplying by exact ones changes nothing
    assert torch.equal(model(x).log_probs, dense)
    assert all(layer.gate.log_alpha.requires_grad for layer in model.layers)


@pytest.mark.parametrize("output_scaling", [False, True])
@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_pruned_model_equals_gated_model_in_eval_and_loses_exactly_the_removed_slices(layer_type, output_scaling):
    closed = {0: [1, 3], 1: [0, 1, 2, 3]}  # layer 1 loses every head
    model = gated_model(layer_type, output_scaling, closed)
    x = torch.randint(0, V, (2, 16))
    gated, gated_memory = two_segments(model, x)
    before = model.num_parameters(include_embeddings=False)

    removed, slices = model.prune_closed_heads()
    assert removed == closed and model.heads_per_layer == [2, 0]
    assert model.head_ids == [[0, 2], []]
    assert slices, "removal must report its slices for the optimizer"
    pruned, pruned_memory = two_segments(model, x)
    torch.testing.assert_close(pruned, gated, rtol=1e-10, atol=1e-10)
    for a, b in zip(pruned_memory, gated_memory, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert before - model.num_parameters(include_embeddings=False) == 6 * removed_parameters_per_head(model)
    assert model.macs_per_token()["per_layer"][1] == (0 if layer_type == "all_attention" else 2 * 32 * 64)


def test_a_layer_with_every_head_removed_is_the_identity():
    model = gated_model("all_attention", True, {0: [0, 1, 2, 3]})
    model.prune_closed_heads()
    h = torch.randn(2, 8, 32, dtype=torch.double)
    layer = model.layers[0]
    assert torch.equal(layer(h, None, model.pos_table[-8:]), h)
    assert model.macs_per_token()["per_layer"][0] == 0
    assert not any(p.requires_grad for p in layer.parameters()), "unused parameters would stall DDP"


@pytest.mark.parametrize("layer_type", LAYER_TYPES)
def test_repeated_removals_with_output_scaling_stay_equal_to_the_gated_model(layer_type):
    model = gated_model(layer_type, True, {0: [2], 1: [1]})
    x = torch.randint(0, V, (2, 16))
    model.prune_closed_heads()
    with torch.no_grad():  # more heads shut after the first removal, as training goes on
        model.layers[0].gate.log_alpha[0] = -0.5
        model.layers[1].gate.log_alpha[[0, 2]] = -0.5
    gated, _ = two_segments(model, x)
    model.prune_closed_heads()
    assert model.heads_per_layer == [2, 1] and model.head_ids == [[1, 3], [2]]
    pruned, _ = two_segments(model, x)
    torch.testing.assert_close(pruned, gated, rtol=1e-10, atol=1e-10)


def test_gated_training_with_output_scaling_multiplies_by_heads_over_open_heads():
    model = small_model(output_scaling=True)
    model.gates_enabled = True
    layer = model.layers[0]
    torch.manual_seed(3)
    g = layer.gate.train()
    torch.manual_seed(3)
    scale = model._head_scale(layer)
    torch.manual_seed(3)
    raw = g().detach()
    expected = raw * (4 / raw.sum().clamp(min=1))
    torch.testing.assert_close(scale.detach(), expected)


def test_optimizer_state_of_surviving_heads_is_kept_exactly():
    torch.manual_seed(0)
    model = small_model()
    model.gates_enabled = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, V, (2, 8))
    for _ in range(2):
        optimizer.zero_grad()
        model(x, target_ids=x).nll.mean().backward()
        optimizer.step()
    attn = model.layers[0].attn
    before_q = optimizer.state[attn.q_proj.weight]["exp_avg_sq"].clone()
    before_pk = optimizer.state[attn.persistent_k]["exp_avg"].clone()
    before_step = optimizer.state[attn.q_proj.weight]["step"].clone()

    slices = model.prune_heads({0: [1]})
    assert slice_optimizer_state_(optimizer, slices) > 0
    kept_rows = torch.cat([torch.arange(0, 8), torch.arange(16, 32)])
    assert torch.equal(optimizer.state[attn.q_proj.weight]["exp_avg_sq"], before_q[kept_rows])
    assert torch.equal(optimizer.state[attn.persistent_k]["exp_avg"], before_pk[[0, 2, 3]])
    assert torch.equal(optimizer.state[attn.q_proj.weight]["step"], before_step)
    optimizer.zero_grad()
    model(x, target_ids=x).nll.mean().backward()
    optimizer.step()  # shapes of parameters, gradients and state agree
    assert torch.isfinite(attn.q_proj.weight).all()


def test_shrink_to_a_layout_then_load_its_weights():
    source = gated_model("all_attention", False, {0: [0], 1: [1, 2]})
    source.prune_closed_heads()
    target = small_model().double()
    target.shrink_to(source.heads_per_layer)
    target.load_state_dict(source.state_dict())
    assert target.head_ids == source.head_ids == [[1, 2, 3], [0, 3]]
    target.gates_enabled = True
    x = torch.randint(0, V, (2, 8))
    torch.testing.assert_close(target.eval()(x).log_probs, source(x).log_probs, rtol=0, atol=0)


def test_bad_pruning_requests_raise_clear_errors():
    model = small_model()
    with pytest.raises(ValueError, match="layer 5 does not exist"):
        model.prune_heads({5: [0]})
    with pytest.raises(ValueError, match=r"heads 0\.\.3 left"):
        model.prune_heads({0: [4]})
    with pytest.raises(ValueError, match="cannot shrink"):
        model.shrink_to([4, 4, 4])
    with pytest.raises(ValueError, match="cannot shrink"):
        model.shrink_to([5, 4])


def test_l0_penalty_and_expected_open_heads_sum_over_layers():
    model = small_model()
    expected = sum(layer.gate.l0() for layer in model.layers)
    torch.testing.assert_close(model.l0_penalty(), expected)
    torch.testing.assert_close(model.expected_open_heads(), torch.sigmoid(torch.tensor(2.0)) * 8)
    model.prune_heads({0: [0, 1, 2, 3]})
    torch.testing.assert_close(model.l0_penalty(), model.layers[1].gate.l0())
    assert model.total_heads == 8


def test_head_map_rows_and_image_show_open_shut_and_removed_heads():
    model = gated_model("all_attention", False, {0: [1], 1: [0, 2]})
    model.prune_heads({1: [0]})  # original head 0 of layer 1 removed; head 2 (now at position 1) still shut
    states = {(r["layer"], r["head"]): r["state"] for r in head_map_rows(model, step=7)}
    assert len(states) == 8
    assert states[(0, 1)] == "shut" and states[(1, 0)] == "removed" and states[(1, 2)] == "shut"
    assert states[(0, 0)] == "open"
    image = head_map_image(model, cell=4)
    assert image.shape == (2 * 4, 4 * 4, 3) and image.dtype.name == "uint8"
    assert tuple(image[4, 0]) == REMOVED_RGB and tuple(image[0, 4]) == SHUT_RGB


def test_folding_the_output_scale_carries_the_moments_over_in_gradient_units():
    model = gated_model("all_attention", True, {0: [1, 3]})
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, V, (2, 8))
    model(x, target_ids=x).nll.mean().backward()
    optimizer.step()
    o_proj = model.layers[0].attn.o_proj.weight
    before = {k: v.clone() for k, v in optimizer.state[o_proj].items()}
    slices = model.eval().prune_heads({0: [1, 3]})  # 4 heads, 2 open -> 2 heads, 2 open: scale 2 folded into W_o
    slice_optimizer_state_(optimizer, slices)
    cols = torch.cat([torch.arange(0, 8), torch.arange(16, 24)])
    torch.testing.assert_close(optimizer.state[o_proj]["exp_avg"], before["exp_avg"][:, cols] / 2)
    torch.testing.assert_close(optimizer.state[o_proj]["exp_avg_sq"], before["exp_avg_sq"][:, cols] / 4)


def test_prune_heads_never_unfreezes_parameters_a_user_froze():
    model = small_model()
    model.layers[0].attn.q_proj.weight.requires_grad_(False)
    model.gates_enabled = True
    model.prune_heads({1: [0]})
    assert not model.layers[0].attn.q_proj.weight.requires_grad
