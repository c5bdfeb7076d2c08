"""The baseline pruning methods (callbacks.head_removal): the random draw, the importance scores against a
finite-difference reference, the global ranking, and HeadRemoval under a real Trainer through the CLI."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from callbacks.head_removal import (
    HeadRemoval,
    head_budget,
    head_importance,
    least_important_heads,
    random_heads,
)
from lightning_modules.cli import run
from lightning_modules.model import MemoryTransformerLM
from lightning_modules.training.language_model import LanguageModel

REPO = Path(__file__).resolve().parents[2]
PRUNE_RECIPE = REPO / "experiments" / "wt2" / "all_attention_2l_prune.yaml"


def tiny_model(layer_type: str = "all_attention", output_scaling: bool = False) -> MemoryTransformerLM:
    torch.manual_seed(0)
    return MemoryTransformerLM(vocab_size=50, layer_type=layer_type, n_layers=2, d_model=16, n_heads=4, d_head=4,
                               n_persistent=8, d_inner=8, tgt_len=8, mem_len=8, cutoffs=[], dropout=0.0,
                               dropemb=0.0, max_len=32, output_scaling=output_scaling)


def batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 50, (2, 8), generator=g), torch.randint(0, 50, (2, 8), generator=g)) for _ in range(n)]


def test_random_draw_removes_exactly_the_budget_and_is_deterministic_per_seed():
    plans = {seed: random_heads([4, 4, 4], 5, seed) for seed in range(6)}
    for plan in plans.values():
        assert sum(len(h) for h in plan.values()) == 5
        assert all(0 <= h < 4 for heads in plan.values() for h in heads)
    assert random_heads([4, 4, 4], 5, 3) == plans[3], "the same seed draws the same heads"
    assert len({str(p) for p in plans.values()}) > 1, "other seeds draw other heads"


def test_budget_is_the_rounded_target_counting_heads_already_removed():
    model = tiny_model()
    assert head_budget(model, 0.43) == 3  # round(0.43 * 8)
    model.prune_heads({0: [0]})
    assert head_budget(model, 0.43) == 2
    assert head_budget(model, 0.99) == sum(model.heads_per_layer) - 1, "never every head"


@pytest.mark.parametrize("layer_type", ["all_attention", "transformer_xl"])
def test_importance_equals_a_finite_difference_reference(layer_type):
    model = tiny_model(layer_type)
    data = batches()
    scores = head_importance(model, data, normalize=False)
    assert not model.gates_enabled and model.training, "the model's state is restored"
    assert all(p.grad is None for p in model.parameters()), "parameters get no gradient"

    # reference: a head mask of ones with one entry nudged by +-eps, by a hook of its own
    def loss_with_mask(layer: int, head: int, delta: float, inputs, targets, memory):
        mask = torch.ones(4)
        mask[head] += delta
        hook = model.layers[layer].gate.register_forward_hook(lambda *_: mask)
        others = [m.gate.register_forward_hook(lambda *_: torch.ones(4))
                  for k, m in enumerate(model.layers) if k != layer]
        try:
            out = model(inputs, target_ids=targets, memory=memory)
        finally:
            for h in (hook, *others):
                h.remove()
        return out.nll.mean(), out.memory

    model.gates_enabled = True
    model.eval()
    eps = 1e-2
    reference = torch.zeros(2, 4)
    with torch.no_grad():
        for layer in range(2):
            for head in range(4):
                memory = None
                for inputs, targets in data:
                    up, _ = loss_with_mask(layer, head, eps, inputs, targets, memory)
                    down, _ = loss_with_mask(layer, head, -eps, inputs, targets, memory)
                    _, memory = loss_with_mask(layer, head, 0.0, inputs, targets, memory)
                    reference[layer, head] += ((up - down) / (2 * eps)).abs()
    torch.testing.assert_close(torch.stack(scores), reference, rtol=2e-2, atol=1e-4)

    scaled = head_importance(tiny_model(layer_type, output_scaling=True), data, normalize=False)
    torch.testing.assert_close(scaled, scores, msg="output scaling is 1 at a full mask and carries no gradient")
    normalized = head_importance(tiny_model(layer_type), data)
    for layer in normalized:
        assert float(layer.norm()) == pytest.approx(1.0, abs=1e-5), "per-layer L2 normalisation"


def test_the_least_important_heads_are_removed_ranked_across_layers():
    scores = [torch.tensor([0.9, 0.1, 0.5, 0.3]), torch.tensor([0.2, 0.8, 0.05, 0.7])]
    assert least_important_heads(scores, 3) == {0: [1], 1: [0, 2]}
    assert least_important_heads(scores, 0) == {}


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="method must be"):
        HeadRemoval(method="magnitude")
    with pytest.raises(ValueError, match="target_sparsity"):
        HeadRemoval(target_sparsity=1.0)


def removal_args(wikitext2_dir: Path, cache: Path, root: Path, **removal) -> list[str]:
    """The 2-layer pruning recipe shrunk to 2 layers x 4 heads of 8, with HeadRemoval in place of the gates."""
    overlay = {"trainer": {"callbacks": [
        {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True, "monitor": None}},
        {"class_path": "callbacks.head_removal.HeadRemoval", "init_args": removal}]}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "overlay.yaml").write_text(yaml.safe_dump(overlay))
    m = "--model.model.init_args."
    return [f"--config={PRUNE_RECIPE}", f"--config={root / 'overlay.yaml'}",
            f"--data.data_dir={wikitext2_dir}", f"--data.cache_dir={cache}", "--data.batch_size=4",
            "--data.tgt_len=16", f"{m}d_model=32", f"{m}d_head=8", f"{m}n_persistent=32", f"{m}d_inner=32",
            f"{m}tgt_len=16", f"{m}mem_len=16", "--model.optimizer.init_args.lr=0.003", "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false", "--trainer.max_steps=40", "--trainer.log_every_n_steps=1",
            "--trainer.val_check_interval=40", "--trainer.limit_val_batches=2", "--trainer.num_sanity_val_steps=0",
            "--trainer.logger=pytorch_lightning.loggers.CSVLogger", f"--trainer.logger.save_dir={root}"]


@pytest.mark.parametrize("method", ["random", "importance"])
def test_head_removal_prunes_at_the_start_then_trains_on_and_saves_a_loadable_model(wikitext2_dir, wt2_cache_dir,
                                                                                   tmp_path, method):
    cli = run(["fit", *removal_args(wikitext2_dir, wt2_cache_dir, tmp_path, method=method, target_sparsity=0.43,
                                    seed=3, score_batches=4)])
    model = cli.model.model
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, HeadRemoval))
    assert sum(model.heads_per_layer) == 5, "round(0.43 * 8) = 3 heads removed"
    if method == "random":
        removed = random_heads([4, 4], 3, 3)
    else:
        assert callback.scores is not None and len(callback.scores) == 2
        removed = least_important_heads(callback.scores, 3)
    assert model.heads_per_layer == [4 - len(removed.get(i, [])) for i in range(2)]
    assert model.head_ids == [[h for h in range(4) if h not in removed.get(i, [])] for i in range(2)]
    (metrics,) = tmp_path.glob("lightning_logs/version_*/metrics.csv")
    with metrics.open() as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 40 and sum(losses[-5:]) < sum(losses[:5]), "the pruned model trains on"

    reloaded = LanguageModel.load_from_checkpoint(tmp_path / "checkpoints" / "pruned.ckpt")
    assert reloaded.model.head_ids == model.head_ids
    x = torch.randint(0, 100, (2, 16))
    torch.testing.assert_close(reloaded.model.eval()(x).log_probs, model.eval()(x).log_probs)
