"""The paper's comparison: All-attention vs Transformer-XL, perplexity against parameters across sparsities.

For each architecture (equal layer-part parameters: N persistent vectors = d_inner), trains a dense baseline,
prunes it from a checkpoint to each target sparsity with the HeadPruning callback, tests every model on the
whole test split, and writes the report (results.csv, report.md, ppl_vs_params.png, head maps). With
``--results`` the CSV, the plot, the report and the exact command and hardware are copied there as well.

Scales (``--scale``): ``wt2-cpu``, the small WikiText-2 models (4 layers, d 256), runs on CPUs in about half an
hour; ``wt103-gpu``, the paper's 16-layer WikiText-103 recipes, for a GPU node (pass ``--trainer.devices=8`` etc.).

    python -m experiments.compare --scale wt2-cpu [--out runs/compare/wt2-cpu] [--results experiments/results/wt2-cpu]
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from experiments import report
from experiments.runs import evaluate_into
from experiments.stages import fit_dense, fit_pruned
from lightning_modules.model import LAYER_TYPES

REPO = Path(__file__).resolve().parents[1]
EXP = REPO / "experiments"


@dataclass(frozen=True)
class Scale:
    """Recipes and schedule of one comparison scale."""

    dense: dict[str, Path]
    prune: dict[str, Path]
    dense_steps: int
    prune_from_step: int
    prune_steps: int
    targets: tuple[float, ...] = (0.25, 0.43, 0.6)
    args: list[str] = field(default_factory=list)


SCALES = {
    "wt2-cpu": Scale(
        dense={t: EXP / "wt2" / f"{t}_small.yaml" for t in LAYER_TYPES},
        prune={t: EXP / "wt2" / "all_attention_small_prune.yaml" for t in LAYER_TYPES},  # layer_type overridden
        dense_steps=500, prune_from_step=350, prune_steps=150, args=["--trainer.limit_val_batches=20"]),
    "wt103-gpu": Scale(
        dense={t: EXP / "wt103" / f"{t}_16l.yaml" for t in LAYER_TYPES},
        prune={t: EXP / "wt103" / f"{t}_16l_prune.yaml" for t in LAYER_TYPES},
        dense_steps=56000, prune_from_step=56000, prune_steps=28000),
}


def run_comparison(scale: Scale, out: Path, extra_args: list[str], use_wandb: bool = True,
                   layer_types: tuple[str, ...] = LAYER_TYPES) -> list[report.RunResult]:
    """Train, prune and test every model of ``scale`` under ``out``; returns the report's runs."""
    args = [*scale.args, *extra_args]
    group = f"compare-{out.name}"
    total = scale.prune_from_step + scale.prune_steps
    for layer_type in layer_types:
        dense_dir = out / f"{layer_type}-dense"
        start = fit_dense(dense_dir, scale.dense[layer_type], layer_type, scale.dense_steps, scale.prune_from_step,
                          args, group, use_wandb, "headprune-compare")
        evaluate_into(dense_dir, scale.dense[layer_type], dense_dir / "checkpoints" / "last.ckpt", args)
        for target in scale.targets:
            folder = out / f"{layer_type}-pruned-{round(100 * target)}"
            pruned = fit_pruned(folder, scale.prune[layer_type], layer_type, start, scale.prune_steps, total, target,
                                args, group, use_wandb, "headprune-compare")
            evaluate_into(folder, scale.dense[layer_type], pruned,
                      [*args, f"--model.model.init_args.layer_type={layer_type}"])
    return report.generate(out)


def publish(out: Path, results: Path, command: str, minutes: float) -> None:
    """Copy the report, CSV and plots to ``results`` with the command, date and hardware that produced them."""
    sys.path.insert(0, str(EXP / "benchmarks"))
    from common import hardware

    results.mkdir(parents=True, exist_ok=True)
    for path in [out / "results.csv", out / "report.md", *out.glob("*.png")]:
        shutil.copy2(path, results / path.name)
    (results / "command.txt").write_text(f"{command}\n# {date.today()}, {hardware()}, {minutes:.0f} min\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="wt2-cpu")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: runs/compare/<scale>)")
    parser.add_argument("--results", type=Path, default=None, help="also copy the results here (e.g. "
                        "experiments/results/wt2-cpu)")
    parser.add_argument("--no-wandb", action="store_true", help="CSV logs only")
    args, extra = parser.parse_known_args()
    out = args.out or REPO / "runs" / "compare" / args.scale
    started = time.perf_counter()
    runs = run_comparison(SCALES[args.scale], out, extra, use_wandb=not args.no_wandb)
    minutes = (time.perf_counter() - started) / 60
    print("\n" + report.markdown_table(runs))
    if args.results:
        publish(out, args.results, "python -m experiments.compare " + shlex.join(sys.argv[1:]), minutes)
    print(f"\n{minutes:.1f} min; report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
