"""The paper's comparison: All-attention vs Transformer-XL, perplexity against parameters across sparsities, with
the hard-concrete gates against random and importance-score head removal.

For each architecture (equal layer-part parameters: N persistent vectors per head = d_inner):

1. **LR sweep**: a short dense run (``sweep_steps``) at each learning rate of ``lrs``; the lowest validation
   perplexity picks the architecture's learning rate (skipped when ``lrs`` is empty: the recipe's rate).
2. **Dense baselines**: one per seed, ``dense_steps`` steps at that rate, validated every ``val_every`` steps
   (within each epoch, as Lightning counts) and once more at the end, so the learning curve ends at the final model.
   The cosine decays over the first ``decay_fraction`` of the steps (sweep points included) and the rest holds its
   final rate: the rate pruning fine-tunes at, so the plateau test (the last 20% of the curve) asks whether the
   model still learns at the rate its pruned versions continue with.
3. **Pruning**: from the end of dense seed ``s``, ``prune_steps`` more steps with each method (``gates``,
   ``random``, ``importance``) to each target; the targets in ``seeded_targets`` for every seed, the others for
   the first seed. Every method gets the same steps, learning rate and data: a constant ``prune_lr_ratio`` x the
   dense peak rate, which is where the dense schedule ended, so pruning does not undo its annealing.

Every model is tested on the whole test split; then the report (results.csv, report.md, plots) is written. A
run whose results are complete (its ``done.json`` marker) is skipped, so an interrupted comparison continues
where it stopped; an incomplete run folder is cleared and the run starts again. ``--stages sweep,dense`` runs
only the first stages (the baselines can train while the rest is prepared). With ``--results`` the CSV, plots,
report and the exact command and hardware are copied there as well.

Scales (``--scale``): ``wt2-cpu``, 2-layer WikiText-2 models (d 64, 4 heads of 16) trained for 9.8 epochs to a
plateau, 3 seeds, about 2 hours on 2 CPU cores with ``--jobs 2`` (results, time and caveats:
experiments/results/wt2-cpu/README.md); ``wt103-gpu``, the paper's 16-layer WikiText-103 recipes, one seed, the
recipes' learning rates, for a GPU node (pass ``--trainer.devices=8`` etc.):

    WIKITEXT_DIR=DIR python -m experiments.compare --scale wt103-gpu --results experiments/results/wt103-gpu

    WIKITEXT_DIR=DIR python -m experiments.compare --scale wt2-cpu --jobs 2 --results experiments/results/wt2-cpu \
        --no-wandb
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from functools import partial
from pathlib import Path

import torch

from experiments import report
from experiments.runs import evaluate_into
from experiments.stages import fit_dense, fit_pruned

REPO = Path(__file__).resolve().parents[1]
EXP = REPO / "experiments"
LAYER_TYPES = ("all_attention", "transformer_xl")
METHODS = ("gates", "random", "importance")
STAGES = ("sweep", "dense", "prune")
DONE = "done.json"
PROJECT = "headprune-compare"


@dataclass(frozen=True)
class Scale:
    """Recipes and schedule of one comparison scale (see the module docstring for the stages)."""

    dense: dict[str, Path]
    prune: dict[str, Path]
    dense_steps: int
    prune_steps: int
    val_every: int
    targets: tuple[float, ...] = (0.25, 0.43, 0.6)
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0,)
    seeded_targets: tuple[float, ...] = ()
    lrs: tuple[float, ...] = ()
    sweep_steps: int = 0
    decay_fraction: float = 1.0  # the cosine spans this fraction of a dense fit; the rest holds the final rate
    prune_lr_ratio: float = 0.1  # the dense recipes' min_lr_ratio: fine-tuning goes on at their final rate
    score_batches: int = 50
    args: list[str] = field(default_factory=list)


SCALES = {
    "wt2-cpu": Scale(
        dense={t: EXP / "wt2" / f"{t}_2l.yaml" for t in LAYER_TYPES},
        prune={t: EXP / "wt2" / "all_attention_2l_prune.yaml" for t in LAYER_TYPES},  # layer_type overridden
        dense_steps=40000, prune_steps=600, val_every=2000, seeds=(0, 1, 2), seeded_targets=(0.25, 0.43, 0.6),
        lrs=(0.002, 0.004, 0.008, 0.016), sweep_steps=2000, decay_fraction=0.8,
        args=["--trainer.limit_val_batches=100"]),
    "wt103-gpu": Scale(
        dense={t: EXP / "wt103" / f"{t}_16l.yaml" for t in LAYER_TYPES},
        prune={t: EXP / "wt103" / f"{t}_16l_prune.yaml" for t in LAYER_TYPES},
        dense_steps=56000, prune_steps=28000, val_every=4000),
}


def is_done(folder: Path) -> bool:
    """Whether the run in ``folder`` completed (its marker is written only after its last step)."""
    return (folder / DONE).is_file()


def once(folder: Path, work: Callable[[], dict]) -> dict:
    """Run ``work`` for ``folder`` unless it is done; an unfinished folder is cleared first. Returns the record
    ``work`` returned (read back from the marker when skipped)."""
    if is_done(folder):
        print(f"[compare] {folder.name}: done, skipped", flush=True)
        return json.loads((folder / DONE).read_text())
    if folder.exists():
        shutil.rmtree(folder)
    started = time.perf_counter()
    record = work() | {"seconds": round(time.perf_counter() - started, 1)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DONE).write_text(json.dumps(record, indent=1))
    return record


def validation_ppl(folder: Path) -> float:
    """The last validation perplexity a fit logged in ``folder``."""
    (metrics,) = folder.glob("logs/version_*/metrics.csv")
    return report.last_metrics(metrics)["val/ppl"]


def schedule_args(scale: Scale, steps: int) -> list[str]:
    """The override ending the cosine at ``decay_fraction`` of a ``steps``-step dense fit (none at 1: the recipe
    decays over the whole fit)."""
    if not 0 < scale.decay_fraction <= 1:
        raise ValueError(f"decay_fraction must be in (0, 1], the share of a fit the cosine spans; got "
                         f"{scale.decay_fraction}")
    if scale.decay_fraction == 1:
        return []
    return [f"--model.decay_steps={max(1, round(scale.decay_fraction * steps))}"]


def sweep_run(scale: Scale, folder: Path, layer_type: str, lr: float, args: list[str], group: str,
              use_wandb: bool) -> dict:
    """One learning-rate sweep point: a dense fit of ``sweep_steps`` steps; returns its validation perplexity."""
    fit_dense(folder, scale.dense[layer_type], layer_type, scale.sweep_steps, scale.sweep_steps,
              [*args, *schedule_args(scale, scale.sweep_steps), f"--model.optimizer.init_args.lr={lr}",
               f"--seed_everything={scale.seeds[0]}"], group,
              use_wandb, PROJECT, name=folder.name, role="sweep", lr=lr, seed=scale.seeds[0])
    return {"lr": lr, "val_ppl": validation_ppl(folder), "steps": scale.sweep_steps}


def sweep_learning_rates(scale: Scale, out: Path, layer_type: str, args: list[str], group: str,
                         use_wandb: bool) -> float | None:
    """The learning rate of ``layer_type``: lowest validation perplexity after ``sweep_steps`` (see module doc);
    None (the recipe's rate) when the scale sweeps none."""
    if not scale.lrs:
        return None
    scores = {}
    for lr in scale.lrs:
        folder = out / "lr-sweep" / f"{layer_type}-lr{lr:g}"
        scores[lr] = once(folder, partial(sweep_run, scale, folder, layer_type, lr, args, group, use_wandb))["val_ppl"]
    best = min(scores, key=scores.get)
    print(f"[compare] {layer_type}: validation ppl by learning rate {scores}; chosen {best:g}", flush=True)
    write_sweep_table(out)
    return best


def write_sweep_table(out: Path) -> None:
    """``lr_sweep.csv`` in ``out``: every completed sweep point (layer type, lr, steps, validation ppl) and
    whether it is its layer type's choice."""
    rows = []
    for marker in sorted((out / "lr-sweep").glob(f"*/{DONE}")):
        record = json.loads(marker.read_text())
        meta = json.loads((marker.parent / report.RUN_FILE).read_text())
        rows.append({"layer_type": meta["layer_type"], "lr": record["lr"], "steps": record["steps"],
                     "val_ppl": round(record["val_ppl"], 2)})
    best = {}
    for row in rows:
        if row["layer_type"] not in best or row["val_ppl"] < best[row["layer_type"]]["val_ppl"]:
            best[row["layer_type"]] = row
    with (out / "lr_sweep.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["layer_type", "lr", "steps", "val_ppl", "chosen"])
        writer.writeheader()
        writer.writerows(row | {"chosen": row is best[row["layer_type"]]} for row in rows)


def lr_args(lr: float | None) -> list[str]:
    """The override setting the learning rate (none: the recipe's)."""
    return [] if lr is None else [f"--model.optimizer.init_args.lr={lr:g}"]


def dense_run(scale: Scale, folder: Path, layer_type: str, seed: int, lr: float | None, args: list[str],
              group: str, use_wandb: bool) -> dict:
    """One dense baseline: ``dense_steps`` steps at ``lr`` from seed ``seed``, then its test."""
    fit_dense(folder, scale.dense[layer_type], layer_type, scale.dense_steps, scale.dense_steps,
              [*args, *schedule_args(scale, scale.dense_steps), *lr_args(lr), f"--seed_everything={seed}"], group,
              use_wandb, PROJECT, val_every=scale.val_every, name=folder.name, seed=seed, lr=lr)
    evaluate_into(folder, scale.dense[layer_type], folder / "checkpoints" / "last.ckpt", args)
    return {"seed": seed, "lr": lr}


def final_validation(scale: Scale, dense_dir: Path, layer_type: str, args: list[str]) -> dict:
    """Validation of a dense baseline's final model (``validate/`` in its folder): the last point of its learning
    curve, wherever the fit's own validations fell within the epochs."""
    evaluate_into(dense_dir, scale.dense[layer_type], dense_dir / "checkpoints" / "last.ckpt", args, "validate")
    return {"step": scale.dense_steps, "val_ppl": validation_ppl(dense_dir / "validate")}


def pruned_run(scale: Scale, folder: Path, layer_type: str, start: Path, method: str, target: float, seed: int,
               lr: float | None, args: list[str], group: str, use_wandb: bool) -> dict:
    """One pruning run from dense checkpoint ``start``: ``prune_steps`` steps with ``method``, then its test."""
    prune_lr = None if lr is None else scale.prune_lr_ratio * lr
    pruned = fit_pruned(folder, scale.prune[layer_type], layer_type, start, scale.prune_steps,
                        scale.dense_steps + scale.prune_steps, target,
                        [*args, *lr_args(prune_lr), f"--seed_everything={seed}"], group, use_wandb, PROJECT,
                        method=method, name=folder.name, seed=seed, score_batches=scale.score_batches, lr=prune_lr)
    evaluate_into(folder, scale.dense[layer_type], pruned, [*args, f"--model.model.init_args.layer_type={layer_type}"])
    return {"seed": seed, "method": method, "target_sparsity": target}


def prune_targets(scale: Scale, seed: int) -> tuple[float, ...]:
    """The targets pruned from dense seed ``seed``: all of them for the first seed, else ``seeded_targets``."""
    return scale.targets if seed == scale.seeds[0] else tuple(t for t in scale.targets if t in scale.seeded_targets)


def run_comparison(scale: Scale, out: Path, extra_args: list[str], use_wandb: bool = True,
                   layer_types: tuple[str, ...] = LAYER_TYPES,
                   stages: tuple[str, ...] = STAGES, seeds: tuple[int, ...] | None = None,
                   jobs: int = 1) -> list[report.RunResult]:
    """Run ``stages`` of ``scale`` under ``out`` for ``seeds`` (default: all of the scale's), skipping completed
    runs; returns the report's runs (empty unless the prune stage ran). When only some layer types or seeds ran
    (other processes may hold the rest), the report covers the runs tested so far.

    ``jobs`` > 1 runs the layer types in that many worker processes at once, the CPU threads shared among them
    (small models use threads poorly: two single-threaded wt2-cpu runs train 1.5x the tokens/s of one run on both
    cores, docs/experiments.md), then writes the report here."""
    if jobs > 1 and len(layer_types) > 1:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        context = multiprocessing.get_context("spawn")  # a fresh interpreter per worker, as a separate run would be
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=torch.set_num_threads,
                                 initargs=(threads,)) as pool:
            work = [pool.submit(run_comparison, scale, out, extra_args, use_wandb, (t,), stages, seeds)
                    for t in layer_types]
            for done in work:
                done.result()  # a worker's failure is raised here
        return run_comparison(scale, out, extra_args, use_wandb, layer_types, stages, seeds)
    args = [*scale.args, *extra_args]
    group = f"compare-{out.name}"
    for layer_type in layer_types:
        lr = sweep_learning_rates(scale, out, layer_type, args, group, use_wandb)
        if "dense" not in stages:
            continue
        for seed in (s for s in scale.seeds if seeds is None or s in seeds):
            dense_dir = out / f"{layer_type}-dense-s{seed}"
            once(dense_dir, partial(dense_run, scale, dense_dir, layer_type, seed, lr, args, group, use_wandb))
            once(dense_dir / "validate", partial(final_validation, scale, dense_dir, layer_type, args))
            if "prune" not in stages:
                continue
            start = dense_dir / "checkpoints" / "last.ckpt"
            for target in prune_targets(scale, seed):
                for method in scale.methods:
                    folder = out / f"{layer_type}-{method}-{round(100 * target)}-s{seed}"
                    once(folder, partial(pruned_run, scale, folder, layer_type, start, method, target, seed, lr, args,
                                         group, use_wandb))
    subset = seeds is not None or set(layer_types) != set(LAYER_TYPES)
    return report.generate(out, tested_only=subset) if "prune" in stages else []


def run_minutes(out: Path) -> float:
    """Minutes the completed runs under ``out`` took, summed from their markers (interrupted and resumed
    invocations included)."""
    return sum(json.loads(marker.read_text()).get("seconds", 0.0) for marker in out.glob(f"**/{DONE}")) / 60


def publish(out: Path, results: Path, command: str, minutes: float) -> None:
    """Copy the report, CSVs and plots to ``results`` with the command, date, hardware and the minutes of its
    runs (and of this invocation)."""
    from experiments.benchmarks.reporting import hardware

    results.mkdir(parents=True, exist_ok=True)
    for path in [out / "report.md", *out.glob("*.csv"), *out.glob("*.png")]:
        shutil.copy2(path, results / path.name)
    (results / "command.txt").write_text(
        f"{command}\n# {date.today()}, {hardware()}, {run_minutes(out):.0f} min of runs in all "
        f"({minutes:.0f} min in this invocation)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="wt2-cpu")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: runs/compare/<scale>)")
    parser.add_argument("--results", type=Path, default=None, help="also copy the results here (e.g. "
                        "experiments/results/wt2-cpu)")
    parser.add_argument("--data-dir", default=os.environ.get("WIKITEXT_DIR") or None,
                        help="local WikiText folder (default: $WIKITEXT_DIR, else the recipe's data_dir)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated stages to run, a prefix of {','.join(STAGES)}")
    parser.add_argument("--layer-types", default=",".join(LAYER_TYPES), help="comma-separated architectures")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds of the scale to run (default: all; "
                        "a subset shares the runs among processes; its report covers the runs tested so far)")
    parser.add_argument("--jobs", type=int, default=1, help="layer types trained at once, in separate processes "
                        "sharing the CPU threads (wt2-cpu on 2 cores: 2)")
    parser.add_argument("--no-wandb", action="store_true", help="CSV logs only")
    args, extra = parser.parse_known_args()
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1; got {args.jobs}")
    stages = tuple(args.stages.split(","))
    if stages != STAGES[: len(stages)]:
        parser.error(f"--stages must be a prefix of {','.join(STAGES)}; got {args.stages}")
    out = args.out or REPO / "runs" / "compare" / args.scale
    data = [f"--data.data_dir={args.data_dir}"] if args.data_dir else []
    started = time.perf_counter()
    runs = run_comparison(SCALES[args.scale], out, [*data, *extra], use_wandb=not args.no_wandb,
                          layer_types=tuple(args.layer_types.split(",")), stages=stages,
                          seeds=tuple(int(s) for s in args.seeds.split(",")) if args.seeds else None, jobs=args.jobs)
    minutes = (time.perf_counter() - started) / 60
    if runs:
        print("\n" + report.markdown_table(runs))
        if args.results:
            data_env = "WIKITEXT_DIR=<WikiText folder> " if os.environ.get("WIKITEXT_DIR") else ""
            command = f"{data_env}python -m experiments.compare " + shlex.join(sys.argv[1:])
            publish(out, args.results, command, minutes)
    print(f"\n{minutes:.1f} min; runs under {out}", flush=True)


if __name__ == "__main__":
    main()
