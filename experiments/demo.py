"""`make demo`: train a small All-attention LM on WikiText-2, prune it to a target sparsity, test both, report.

Both models see the same number of training steps: the dense run trains ``dense_steps`` and saves a checkpoint at
``prune_from_step``; the pruning run starts there and trains ``dense_steps - prune_from_step`` steps with the
HeadPruning callback (target-sparsity mode), removing heads as their gates shut. Then ``headprune test`` runs on
the dense run's last checkpoint and on ``pruned.ckpt``, and the report (table, CSV, plots) is generated from those
runs' logs. Everything also goes to wandb, offline unless you are logged in (``WANDB_MODE`` is respected).

    python -m experiments.demo [--out runs/demo] [--data-dir DIR] [--target 0.5] [--dense-steps 500]
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime
from pathlib import Path

from experiments import report
from experiments.runs import evaluate_into
from experiments.stages import fit_dense, fit_pruned

REPO = Path(__file__).resolve().parents[1]
DENSE_RECIPE = REPO / "experiments" / "wt2" / "all_attention_small.yaml"
PRUNE_RECIPE = REPO / "experiments" / "wt2" / "all_attention_small_prune.yaml"
PROJECT = "headprune-demo"


def run_pipeline(out: Path, data_dir: str | None, target: float, dense_steps: int, prune_from_step: int,
                 extra_args: list[str], wandb: bool = True, limit_val_batches: int = 20) -> list[report.RunResult]:
    """Dense fit, pruning fit, both tests, report. ``extra_args`` (CLI overrides) shrink the model in tests."""
    if not 0 < prune_from_step < dense_steps:
        raise ValueError(f"need 0 < prune_from_step < dense_steps; got {prune_from_step}, {dense_steps}")
    group = out.name
    data = [f"--data.data_dir={data_dir}"] if data_dir else []  # the recipe's null: $WIKITEXT_DIR, else the hub
    common = [*data, f"--trainer.limit_val_batches={limit_val_batches}", *extra_args]
    dense_dir, pruned_dir = out / "dense", out / "pruned"
    start = fit_dense(dense_dir, DENSE_RECIPE, "all_attention", dense_steps, prune_from_step, common, group, wandb,
                      PROJECT)
    pruned = fit_pruned(pruned_dir, PRUNE_RECIPE, "all_attention", start, dense_steps - prune_from_step, dense_steps,
                        target, common, group, wandb, PROJECT)
    evaluate_into(dense_dir, DENSE_RECIPE, dense_dir / "checkpoints" / "last.ckpt", common)
    evaluate_into(pruned_dir, DENSE_RECIPE, pruned, common)
    return report.generate(out)


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
    out = args.out or REPO / "runs" / "demo" / datetime.now().strftime("%Y%m%d-%H%M%S")
    started = time.perf_counter()
    runs = run_pipeline(out, args.data_dir, args.target, args.dense_steps, args.prune_from_step, extra,
                        wandb=not args.no_wandb)
    minutes = (time.perf_counter() - started) / 60
    print("\n" + report.markdown_table(runs))
    print(f"\n{minutes:.1f} min. Report, CSV and plots: {out}/report.md, results.csv, *.png")
    if args.dense_steps < 2000:
        print(f"Note: {args.dense_steps} training steps is a short run (the recipe's full length is 2,000); "
              "perplexities are those of undertrained models, and the pruning cost is measured at equal steps.")


if __name__ == "__main__":
    main()
