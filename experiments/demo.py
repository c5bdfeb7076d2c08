"""`make demo`: train a small All-attention LM on WikiText-2, prune it to a target sparsity, test both, report.

Both models see the same number of training steps: the dense run trains ``dense_steps`` and saves a checkpoint at
``prune_from_step``; the pruning run starts there and trains ``dense_steps - prune_from_step`` steps with the
HeadPruning callback (target-sparsity mode), removing heads as their gates shut. Then ``headprune test`` runs on
the dense run's last checkpoint and on ``pruned.ckpt``, the report (table, CSV, plots) is generated from those
runs' logs, and the pruned model is exported to ``export/`` (``config.json`` + ``model.safetensors`` + model card,
loadable with ``MemoryTransformerLM.from_pretrained``). Everything also goes to wandb, offline unless you are logged
in (``WANDB_MODE`` is respected).

    python -m experiments.demo [--out runs/demo] [--data-dir DIR] [--target 0.5] [--dense-steps 500]
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time
from datetime import datetime
from pathlib import Path

from experiments import report
from experiments.runs import evaluate_into
from experiments.stages import fit_dense, fit_pruned
from lightning_modules.errors import UsageError, exit_with
from lightning_modules.export import TRAINING_CONFIG, export_checkpoint

REPO = Path(__file__).resolve().parents[1]
DENSE_RECIPE = REPO / "experiments" / "wt2" / "all_attention_small.yaml"
PRUNE_RECIPE = REPO / "experiments" / "wt2" / "all_attention_small_prune.yaml"
PROJECT = "headprune-demo"


def progress(message: str) -> None:
    """One line of the pipeline's progress, flushed at once."""
    print(f"[demo] {message}", flush=True)


def run_pipeline(out: Path, data_dir: str | None, target: float, dense_steps: int, prune_from_step: int,
                 extra_args: list[str], wandb: bool = True, limit_val_batches: int = 20,
                 command: str | None = None) -> list[report.RunResult]:
    """Dense fit, pruning fit, both tests, report, export of the pruned model to ``out/export`` (``command``, how
    the demo was started, goes into its model card). ``extra_args`` (CLI overrides) shrink the model in tests."""
    if not 0 < prune_from_step < dense_steps:
        raise UsageError(f"need 0 < prune_from_step < dense_steps; got {prune_from_step}, {dense_steps}")
    group = out.name
    data = [f"--data.data_dir={data_dir}"] if data_dir else []  # the recipe's null: $WIKITEXT_DIR, else the hub
    # the pipeline reports its own progress: no per-batch bars or layer tables from each stage
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    common = [*data, f"--trainer.limit_val_batches={limit_val_batches}", *quiet, *extra_args]
    dense_dir, pruned_dir = out / "dense", out / "pruned"
    progress(f"1/5 training the dense model ({dense_steps} steps, checkpoint at step {prune_from_step}) in {dense_dir}")
    start = fit_dense(dense_dir, DENSE_RECIPE, "all_attention", dense_steps, prune_from_step, common, group, wandb,
                      PROJECT)
    progress(f"2/5 pruning {target:.0%} of the heads from step {prune_from_step} "
             f"({dense_steps - prune_from_step} steps) in {pruned_dir}")
    pruned = fit_pruned(pruned_dir, PRUNE_RECIPE, "all_attention", start, dense_steps - prune_from_step, dense_steps,
                        target, common, group, wandb, PROJECT)
    progress("3/5 testing the dense and the pruned model")
    evaluate_into(dense_dir, DENSE_RECIPE, dense_dir / "checkpoints" / "last.ckpt", ["--verbose=false", *common])
    evaluate_into(pruned_dir, DENSE_RECIPE, pruned, ["--verbose=false", *common])
    progress("4/5 writing the report")
    runs = report.generate(out)
    progress(f"5/5 exporting the pruned model to {out / 'export'}")
    test_ppl = next((r.test_ppl for r in runs if r.role == "pruned"), None)
    how = None if command is None else f"{command}\n# its pruning stage alone: headprune fit --config {TRAINING_CONFIG}"
    export_checkpoint(pruned, out / "export", test_ppl=test_ppl, command=how)
    return runs


def quiet_output() -> None:
    """Keep the demo's output to its progress lines, the heads removed, warnings and the results: Lightning's and
    wandb's start-up notes are left out (the logs and run folders keep everything)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("callbacks.head_pruning").setLevel(logging.INFO)  # which heads go, and when
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("WANDB_SILENT", "true")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: runs/demo/<date-time>)")
    parser.add_argument("--data-dir", default=None,
                        help="local WikiText-2 folder (default: $WIKITEXT_DIR, else the hub)")
    parser.add_argument("--target", type=float, default=0.5, help="fraction of heads to remove")
    parser.add_argument("--dense-steps", type=int, default=500, help="training steps of each model")
    parser.add_argument("--prune-from-step", type=int, default=350, help="dense step the pruning run starts from")
    parser.add_argument("--no-wandb", action="store_true", help="CSV logs only")
    args, extra = parser.parse_known_args()
    quiet_output()
    out = args.out or REPO / "runs" / "demo" / datetime.now().strftime("%Y%m%d-%H%M%S")
    started = time.perf_counter()
    command = shlex.join(["python", "-m", "experiments.demo", *sys.argv[1:]])
    try:
        runs = run_pipeline(out, args.data_dir, args.target, args.dense_steps, args.prune_from_step, extra,
                            wandb=not args.no_wandb, command=command)
    except UsageError as error:  # a bad option or data folder: one line, exit status 2 (docs/cli-errors.md)
        exit_with(error, prog="demo")
    minutes = (time.perf_counter() - started) / 60
    print("\n" + report.markdown_table(runs))
    print(f"\n{minutes:.1f} min. Report, CSV and plots: {out}/report.md, results.csv, *.png")
    print(f"Pruned model exported to {out}/export (MemoryTransformerLM.from_pretrained, see docs/export.md)")
    if args.dense_steps < 2000:
        print(f"Note: {args.dense_steps} training steps is a short run (the recipe's full length is 2,000); "
              "perplexities are those of undertrained models, and the pruning cost is measured at equal steps.")


if __name__ == "__main__":
    main()
