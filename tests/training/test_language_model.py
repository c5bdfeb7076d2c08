"""LanguageModel: memory carried across batches, perplexity over a split, the optimiser and the schedule."""

from __future__ import annotations

import math
from functools import partial

import pytest
import pytorch_lightning as pl
import torch

from lightning_modules.model import MemoryTransformerLM
from lightning_modules.training.language_model import LanguageModel
from lightning_modules.training.optim import Lamb, warmup_cosine_factor

VOCAB = 50


def tiny_model(**overrides) -> MemoryTransformerLM:
    config = dict(vocab_size=VOCAB, layer_type="all_attention", n_layers=2, d_model=32, n_heads=4, d_head=8,
                  n_persistent=16, d_inner=64, tgt_len=8, mem_len=8, cutoffs=[], div_value=1.0, dropout=0.0,
                  dropemb=0.0)
    return MemoryTransformerLM(**(config | overrides))


def batches(steps: int, batch_size: int = 2, tgt_len: int = 8, seed: int = 0):
    stream = torch.randint(2, VOCAB, (batch_size, steps * tgt_len + 1), generator=torch.Generator().manual_seed(seed))
    return [(stream[:, k * tgt_len:(k + 1) * tgt_len], stream[:, k * tgt_len + 1:(k + 1) * tgt_len + 1])
            for k in range(steps)]


def test_memory_is_carried_between_batches_and_reset_per_evaluation():
    module = LanguageModel(tiny_model()).eval()
    data = batches(3)
    with torch.no_grad():
        module.on_validation_epoch_start()
        for batch in data:
            module.validation_step(batch, 0)
        memory, carried_total = None, 0.0
        for x, y in data:
            out = module.model(x, target_ids=y, memory=memory)
            memory, carried_total = out.memory, carried_total + out.nll.sum()
        fresh_total = sum(module.model(x, target_ids=y).nll.sum() for x, y in data)
    torch.testing.assert_close(module.nll_sum["val"].compute().float(), carried_total)
    assert not torch.isclose(carried_total, fresh_total), "memory must change the scores of later batches"
    for kept, expected in zip(module._memory["val"], memory, strict=True):
        torch.testing.assert_close(kept, expected)
    module.on_validation_epoch_start()
    assert module._memory["val"] is None


def test_perplexity_is_exp_of_token_weighted_mean_nll_with_padding_unscored():
    module = LanguageModel(tiny_model()).eval()
    data = batches(2)
    padded_x, padded_y = data[1][0].clone(), data[1][1].clone()
    padded_y[:, 5:] = -100
    data[1] = (padded_x, padded_y)
    module.on_validation_epoch_start()
    with torch.no_grad():
        for batch in data:
            module.validation_step(batch, 0)
        first = module.model(data[0][0], target_ids=data[0][1])
        second = module.model(data[1][0], target_ids=data[1][1].clamp(min=0), memory=first.memory).nll[:, :5]
    expected = (first.nll.sum() + second.sum()) / (first.nll.numel() + second.numel())
    mean = module.nll_sum["val"].compute() / module.token_count["val"].compute()
    assert module.token_count["val"].compute() == 16 + 10
    assert torch.isclose(mean.float(), expected, rtol=1e-5)


def test_dense_training_loss_decreases_on_a_tiny_overfit():
    torch.manual_seed(0)
    module = LanguageModel(tiny_model(), optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    data = batches(2)
    trainer = pl.Trainer(max_steps=60, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer.callbacks.append(Record())
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    assert losses[-1] < 0.5 * losses[0]


def test_lamb_step_matches_its_formula():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    grad = torch.randn(5, 3)
    w0 = w.detach().clone()
    optimizer = Lamb([w], lr=0.1, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01)
    w.grad = grad.clone()
    optimizer.step()
    m, v = 0.1 * grad, 0.01 * grad**2
    update = m / (v.sqrt() + 1e-6) + 0.01 * w0
    trust = w0.norm().clamp(0, 10) / update.norm()
    torch.testing.assert_close(w.detach(), w0 - 0.1 * trust * update)


def test_lamb_rejects_bad_settings():
    with pytest.raises(ValueError, match="invalid LAMB"):
        Lamb([torch.nn.Parameter(torch.ones(1))], lr=-1)


def test_warmup_cosine_schedule():
    assert warmup_cosine_factor(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine_factor(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine_factor(60, 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine_factor(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine_factor(500, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine_factor(35, 10, 110, 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))


def test_bad_schedule_values_are_rejected():
    with pytest.raises(ValueError, match="invalid schedule"):
        LanguageModel(tiny_model(), min_lr_ratio=2.0)


def test_learning_rate_follows_the_warmup_cosine_schedule_and_is_logged():
    module = LanguageModel(tiny_model(), optimizer=lambda p: torch.optim.SGD(p, lr=0.5), warmup_steps=2,
                           decay_steps=6, min_lr_ratio=0.2)
    seen = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(trainer.callback_metrics["train/lr"]))

    trainer = pl.Trainer(max_steps=7, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=[Record()])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches(7), batch_size=None))
    expected = [0.5 * warmup_cosine_factor(step, 2, 6, 0.2) for step in range(7)]
    assert seen == pytest.approx(expected)


def test_constant_schedule_warms_up_then_holds_the_peak():
    module = LanguageModel(tiny_model(), optimizer=lambda p: torch.optim.SGD(p, lr=0.5), lr_schedule="constant",
                           warmup_steps=2)
    trainer = pl.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches(5), batch_size=None))
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert [scheduler.lr_lambdas[0](step) for step in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]


def test_a_nan_batch_makes_the_perplexity_nan_instead_of_vanishing():
    module = LanguageModel(tiny_model())
    module.nll_sum["val"].update(torch.tensor(40.0))
    module.token_count["val"].update(torch.tensor(10))
    module.nll_sum["val"].update(torch.tensor(float("nan")))
    module.token_count["val"].update(torch.tensor(10))
    assert torch.isnan(module.nll_sum["val"].compute() / module.token_count["val"].compute())
    assert module.nll_sum["val"].compute().dtype == torch.float64


class MemoryProbe(LanguageModel):
    """Records, for every step, (stage, batch_idx, whether it started from an empty memory)."""

    def __init__(self, model: MemoryTransformerLM) -> None:
        super().__init__(model, optimizer=lambda p: torch.optim.SGD(p, lr=0.01))
        self.seen: list[tuple[str, int, bool]] = []

    def _scored_nll(self, batch, stage):
        self.seen.append((stage, self.trainer.current_epoch, self._memory[stage] is None))
        return super()._scored_nll(batch, stage)


def test_real_trainer_resets_memory_per_epoch_and_evaluation_and_after_the_sanity_check():
    module = MemoryProbe(tiny_model())
    loader = torch.utils.data.DataLoader(batches(3), batch_size=None)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=2)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    fresh = [(stage, epoch) for stage, epoch, empty in module.seen if empty]
    # the sanity check, each training epoch and each validation start from an empty memory, nothing else does
    assert fresh == [("val", 0), ("train", 0), ("val", 0), ("train", 1), ("val", 1)]
    assert len(module.seen) == 2 + 2 * (3 + 3)


def test_gates_train_at_gate_lr_factor_times_the_learning_rate_without_weight_decay():
    module = LanguageModel(tiny_model(), optimizer=partial(torch.optim.AdamW, lr=2e-3, weight_decay=0.1),
                           gate_lr_factor=10.0)
    module.trainer = pl.Trainer(max_steps=5, logger=False, enable_checkpointing=False)
    optimizer = module.configure_optimizers()["optimizer"]
    weights, gates = optimizer.param_groups
    assert gates["lr"] == pytest.approx(0.02) and gates["weight_decay"] == 0.0
    assert weights["lr"] == pytest.approx(2e-3) and weights["weight_decay"] == 0.1
    assert {id(p) for p in gates["params"]} == {id(layer.gate.log_alpha) for layer in module.model.layers}


def test_init_from_loads_a_baseline_and_starts_the_gates_fresh(tmp_path):
    baseline = LanguageModel(tiny_model())
    with torch.no_grad():
        for layer in baseline.model.layers:
            layer.gate.log_alpha.fill_(-3.0)  # must not be carried over
    path = tmp_path / "baseline.ckpt"
    checkpoint = {"state_dict": baseline.state_dict()}
    baseline.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)

    pruning = LanguageModel(tiny_model(gate_init=1.5), init_from=str(path))
    pruning.setup("fit")
    for (name, ours), theirs in zip(pruning.model.state_dict().items(), baseline.model.state_dict().values(),
                                    strict=True):
        if name.endswith("gate.log_alpha"):
            assert torch.equal(ours, torch.full_like(ours, 1.5)), name
        else:
            assert torch.equal(ours, theirs), name

    wrong_vocab = LanguageModel(tiny_model(vocab_size=VOCAB + 1), init_from=str(path))
    with pytest.raises(ValueError, match=r"vocab_size: 50 there, 51 here.*different vocabulary"):
        wrong_vocab.setup("fit")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LanguageModel(tiny_model(), init_from=str(tmp_path / "missing.ckpt")).setup("fit")


def test_a_checkpoint_from_before_head_gates_still_loads(tmp_path):
    """Baselines written before gates existed lack gate and head-id entries: init_from and strict loads cope."""
    old = LanguageModel(tiny_model())
    state = {k: v for k, v in old.state_dict().items() if "gate." not in k and "head_ids" not in k}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": state, "pytorch-lightning_version": pl.__version__, "hyper_parameters": {}}, path)
    pruning = LanguageModel(tiny_model(), init_from=str(path))
    pruning.setup("fit")
    assert torch.equal(pruning.model.layers[0].attn.q_proj.weight, old.model.layers[0].attn.q_proj.weight)
    reloaded = LanguageModel.load_from_checkpoint(path, model=tiny_model())
    assert torch.equal(reloaded.model.layers[1].attn.persistent_v, old.model.layers[1].attn.persistent_v)
    assert reloaded.model.head_ids == [[0, 1, 2, 3]] * 2


def test_loading_a_checkpoint_drops_init_from_so_a_later_fit_keeps_the_loaded_weights(tmp_path):
    module = LanguageModel(tiny_model(), init_from=str(tmp_path / "baseline.ckpt"))
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    module.on_load_checkpoint(checkpoint)
    assert module.init_from is None
    module.setup("fit")  # would raise FileNotFoundError if it still tried the baseline


def test_a_checkpoint_with_the_older_layer_norm_names_loads_everywhere(tmp_path):
    """All-attention checkpoints written before the layer norm was named ``attn_norm`` call it ``norm``; loading
    (strict, init_from, load_from_checkpoint) renames it and the weights arrive unchanged."""
    old = LanguageModel(tiny_model())
    with torch.no_grad():
        old.model.layers[1].attn_norm.weight.uniform_()
    checkpoint = {"state_dict": {k.replace(".attn_norm.", ".norm."): v for k, v in old.state_dict().items()},
                  "pytorch-lightning_version": pl.__version__, "hyper_parameters": {}}
    assert "model.layers.1.norm.weight" in checkpoint["state_dict"]
    old.on_save_checkpoint(checkpoint)
    path = tmp_path / "old-names.ckpt"
    torch.save(checkpoint, path)
    expected = old.model.layers[1].attn_norm.weight
    assert torch.equal(LanguageModel.load_from_checkpoint(path).model.layers[1].attn_norm.weight, expected)
    started = LanguageModel(tiny_model(), init_from=str(path))
    started.setup("fit")
    assert torch.equal(started.model.layers[1].attn_norm.weight, expected)
