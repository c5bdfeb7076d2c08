"""The workloads the benchmarks time: model shapes (W1 and the paper's layers), how a model is built and pruned for
them, their input tokens, and the callables that run an eval forward or a training step of the whole model or of
its layer stack alone."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lightning_modules.model import MemoryTransformerLM
from lightning_modules.model.attention import blocked_mask
from lightning_modules.model.slicing import slice_optimizer_state_

# W1: the small WikiText-2 model of the CPU recipes, dropout off, segment 64 + memory 64, batch 8
W1 = dict(vocab_size=33278, cutoffs=[2000, 10000], div_value=4.0, n_layers=4, d_model=256, n_heads=8, d_head=32,
          n_persistent=1024, d_inner=1024, tgt_len=64, mem_len=64, dropout=0.0, dropemb=0.0, dropatt=0.0,
          max_len=128)
W1_BATCH = 8
W1_NAME = "W1"
# the paper's layers (d 512, 8 heads of 64, N = d_inner = 2048, segment 192 + memory 192) with a tiny vocabulary:
# the embedding and softmax do not change with pruning, so the layer stack is what these workloads time
PAPER_SHAPES = dict(vocab_size=64, d_model=512, n_heads=8, d_head=64, n_persistent=2048, d_inner=2048, tgt_len=192,
                    mem_len=192, cutoffs=[], div_value=1.0, dropout=0.0, dropemb=0.0, dropatt=0.0, max_len=512)


def local_wikitext2() -> Path | None:
    """The local WikiText-2 copy named by ``WIKITEXT_DIR`` (the datamodule's variable), if any."""
    from datamodules.wikitext import DATA_DIR_ENV

    value = os.environ.get(DATA_DIR_ENV)
    return Path(value) if value else None


def first_heads(removed: float, n_heads: int, n_layers: int) -> dict[int, list[int]]:
    """The removal plan that takes the first ``removed`` fraction of every layer's heads."""
    drop = round(removed * n_heads)
    return {i: list(range(drop)) for i in range(n_layers)} if drop else {}


def build(layer_type: str, removed: float = 0.0, shapes: dict | None = None, seed: int = 0,
          **overrides: object) -> MemoryTransformerLM:
    """A model of ``shapes`` (default W1) and ``layer_type``, seeded, with ``removed`` of every layer's heads
    physically pruned; ``overrides`` change settings (``n_layers``, ``attn_impl``...)."""
    settings = {**(W1 if shapes is None else shapes), **overrides}
    torch.manual_seed(seed)
    model = MemoryTransformerLM(layer_type=layer_type, **settings)
    model.prune_heads(first_heads(removed, settings["n_heads"], settings["n_layers"]))
    return model


def token_batch(data_dir: Path | None, batch: int = W1_BATCH, tgt_len: int = W1["tgt_len"],
                vocab_size: int = W1["vocab_size"]) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Two consecutive segments' worth of inputs/targets [B, 2T]: WikiText-2 train text when ``data_dir`` holds it
    (its vocabulary must be ``vocab_size``), else Zipf-drawn ids; and a word for which."""
    if data_dir is not None and (data_dir / "wiki.train.tokens").exists():
        from datamodules.wikitext import WikiTextDataModule

        dm = WikiTextDataModule(name="wikitext-2", data_dir=str(data_dir), batch_size=batch, tgt_len=2 * tgt_len)
        dm.prepare_data()
        dm.setup("fit")
        if dm.vocab_size != vocab_size:
            raise SystemExit(f"{data_dir} has a vocabulary of {dm.vocab_size}, the workload needs {vocab_size}")
        x, y = next(iter(dm.train_dataloader()))
        return x, y, "WikiText-2 train"
    gen = torch.Generator().manual_seed(0)
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    ids = torch.multinomial(1 / ranks, batch * (2 * tgt_len + 1), replacement=True, generator=gen).view(batch, -1)
    return ids[:, :-1], ids[:, 1:], "Zipf(1) ids"


def run_stack(model: MemoryTransformerLM, h: torch.Tensor, memory: list[torch.Tensor]) -> torch.Tensor:
    """The layer stack alone over input ``h`` [B, T, d], each layer over its memory, as the model's forward runs
    it (embedding and adaptive softmax left out: pruning does not change them)."""
    pos_emb = model.pos_table[-(memory[0].size(1) + h.size(1)):]
    blocked = blocked_mask(h.size(1), memory[0].size(1), model.config.same_length, h.device)  # (T, S)
    for layer, mem in zip(model.layers, memory, strict=False):
        h = layer(h, mem, pos_emb, blocked)
    return h


class Workload:
    """One model with its optimizer, a segment, and the memory a previous segment left: callables that run an eval
    forward or a training step of the whole model or of the layer stack alone. ``x``/``y`` hold two segments
    [B, 2T]: the first fills the memory, the second is timed."""

    def __init__(self, model: MemoryTransformerLM, x: torch.Tensor, y: torch.Tensor) -> None:
        T = model.tgt_len
        self.model = model
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
        self.x, self.y = x[:, T:], y[:, T:]
        with torch.no_grad():
            self.memory = model.eval()(x[:, :T], y[:, :T]).memory
            self.h = model.embedding(self.x) * model.d_model**0.5  # the layer stack's input

    def stack_eval(self) -> None:
        with torch.no_grad():
            self.model.eval()
            run_stack(self.model, self.h, self.memory)

    def stack_train(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        run_stack(self.model, self.h, self.memory).square().mean().backward()
        self.optimizer.step()

    def model_eval(self) -> None:
        with torch.no_grad():
            self.model.eval()(self.x, self.y, memory=self.memory)

    def model_train(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self.model(self.x, self.y, memory=self.memory).nll.mean().backward()
        self.optimizer.step()

    def remove_heads(self, removed: float) -> None:
        """Remove the first ``removed`` fraction of every layer's heads in place, slicing the optimizer state as
        HeadPruning does."""
        plan = first_heads(removed, self.model.config.n_heads, self.model.n_layers)
        slice_optimizer_state_(self.optimizer, self.model.prune_heads(plan))

    def layer_macs(self) -> int:
        """Multiply-accumulates of one forward of the layer stack over the segment."""
        return self.model.macs_per_token()["layers"] * self.x.numel()

    def layer_flops(self, training: bool) -> int:
        """FLOPs of one pass of the layer stack over the segment (2 per MAC; x3 for forward + backward)."""
        return (6 if training else 2) * self.layer_macs()
