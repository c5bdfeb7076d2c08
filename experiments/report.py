"""Regenerate the results table, CSV and plots from finished runs.

A run folder holds ``run.json`` (written when the run is launched: name, layer type, role, target) and the CSV
logs of its ``headprune test`` under ``test/``; a pruning run also has the ``head_map.csv`` its HeadPruning
callback wrote. Every figure in the report comes from those files.

    python -m experiments.report RUNS_FOLDER [--out FOLDER]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

RUN_FILE = "run.json"
RESULT_FIELDS = ("name", "layer_type", "method", "role", "target_sparsity", "seed", "steps", "test_ppl", "params_total",
                 "params_non_embedding", "macs_per_token", "heads", "heads_per_layer", "tokens_per_s")


@dataclass
class RunResult:
    """What one evaluated model measured."""

    name: str
    layer_type: str
    role: str  # "dense" or "pruned"
    target_sparsity: float | None
    test_ppl: float
    params_total: int
    params_non_embedding: int
    macs_per_token: int
    heads: int
    heads_per_layer: list[int] = field(default_factory=list)
    tokens_per_s: float = math.nan
    steps: int | None = None
    folder: Path | None = None
    method: str = "dense"  # dense, gates, random or importance
    seed: int | None = None


def write_run_file(folder: Path, **meta: object) -> None:
    """Record what a run is (name, layer_type, role, target_sparsity, steps...) for the report."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUN_FILE).write_text(json.dumps(meta, indent=1))


def last_metrics(metrics_csv: Path) -> dict[str, float]:
    """The last logged value of every metric in a Lightning CSV log."""
    values: dict[str, float] = {}
    with metrics_csv.open() as f:
        for row in csv.DictReader(f):
            values |= {key: float(value) for key, value in row.items() if value not in ("", None)}
    return values


def read_run(folder: Path) -> RunResult:
    """The result of the run in ``folder``; a clear error when its test has not been run."""
    meta = json.loads((folder / RUN_FILE).read_text())
    logs = sorted((folder / "test").glob("**/metrics.csv"), key=lambda p: p.stat().st_mtime)
    metrics = last_metrics(logs[-1]) if logs else {}
    if "test/ppl" not in metrics:
        raise FileNotFoundError(f"{folder} has no test metrics (test/**/metrics.csv with test/ppl); run "
                                "`headprune test` on its checkpoint with a CSVLogger saving to that folder")
    layers = sorted((k for k in metrics if k.startswith("test/heads/layer_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    return RunResult(
        name=meta["name"], layer_type=meta["layer_type"], role=meta["role"],
        target_sparsity=meta.get("target_sparsity"), test_ppl=metrics["test/ppl"],
        params_total=int(metrics["test/params_total"]), params_non_embedding=int(metrics["test/params_non_embedding"]),
        macs_per_token=int(metrics["test/macs_per_token"]), heads=int(metrics["test/heads"]),
        heads_per_layer=[int(metrics[k]) for k in layers], tokens_per_s=metrics.get("test/tokens_per_s", math.nan),
        steps=meta.get("steps"), folder=folder, seed=meta.get("seed"),
        method=meta.get("method") or ("dense" if meta["role"] == "dense" else "gates"),
    )


def has_test_metrics(folder: Path) -> bool:
    """Whether the run in ``folder`` has been tested (its test log holds test/ppl)."""
    return any("test/ppl" in last_metrics(path) for path in (folder / "test").glob("**/metrics.csv"))


def collect(root: Path, tested_only: bool = False) -> list[RunResult]:
    """Every dense and pruned run under ``root`` (any depth; learning-rate sweep runs are left out), dense
    before pruned, then by name. With ``tested_only`` runs without test metrics are left out instead of being
    an error."""
    folders = [path.parent for path in sorted(root.glob(f"**/{RUN_FILE}"))]
    folders = [f for f in folders if json.loads((f / RUN_FILE).read_text())["role"] in ("dense", "pruned")]
    runs = [read_run(f) for f in folders if not tested_only or has_test_metrics(f)]
    return sorted(runs, key=lambda r: (r.layer_type, r.role != "dense", r.target_sparsity or 0.0, r.name))


def markdown_table(runs: list[RunResult]) -> str:
    """The results as a Markdown table, with each pruned model's cost against its architecture's dense one."""
    dense = {r.layer_type: r for r in runs if r.role == "dense"} | {
        (r.layer_type, r.seed): r for r in runs if r.role == "dense"}
    lines = ["| model | layer type | target | heads per layer | test ppl | ppl vs dense | params (total) | "
             "params (non-embedding) | MACs/token | eval tokens/s | speed-up |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        base = dense.get((r.layer_type, r.seed)) or dense.get(r.layer_type)
        ppl_change = f"{100 * (r.test_ppl / base.test_ppl - 1):+.1f}%" if base and r is not base else ""
        speedup = f"{r.tokens_per_s / base.tokens_per_s:.2f}x" if base and r is not base else ""
        target = f"{r.target_sparsity:.0%}" if r.target_sparsity else ""
        lines.append(f"| {r.name} | {r.layer_type} | {target} | {', '.join(map(str, r.heads_per_layer))} | "
                     f"{r.test_ppl:.1f} | {ppl_change} | {r.params_total:,} | {r.params_non_embedding:,} | "
                     f"{r.macs_per_token:,} | {r.tokens_per_s:,.0f} | {speedup} |")
    return "\n".join(lines)


def write_csv(runs: list[RunResult], path: Path) -> None:
    """One row per run."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(RESULT_FIELDS))
        writer.writeheader()
        for r in runs:
            row = {k: v for k, v in asdict(r).items() if k in RESULT_FIELDS}
            row["heads_per_layer"] = " ".join(map(str, r.heads_per_layer))
            writer.writerow(row)


@dataclass
class Group:
    """The runs of one layer type, method and target over their seeds."""

    layer_type: str
    method: str
    target_sparsity: float | None
    runs: list[RunResult]

    @property
    def ppl_mean(self) -> float:
        return sum(r.test_ppl for r in self.runs) / len(self.runs)

    @property
    def ppl_std(self) -> float:
        """Sample standard deviation over the seeds (0 for a single run)."""
        n = len(self.runs)
        if n < 2:
            return 0.0
        return math.sqrt(sum((r.test_ppl - self.ppl_mean) ** 2 for r in self.runs) / (n - 1))

    @property
    def params_mean(self) -> float:
        return sum(r.params_non_embedding for r in self.runs) / len(self.runs)


def summarize(runs: list[RunResult]) -> list[Group]:
    """The runs grouped by layer type, method and target (seeds pooled), in report order."""
    groups: dict[tuple, Group] = {}
    for r in runs:
        key = (r.layer_type, r.method, r.target_sparsity)
        groups.setdefault(key, Group(r.layer_type, r.method, r.target_sparsity, [])).runs.append(r)
    return sorted(groups.values(), key=lambda g: (g.layer_type, g.target_sparsity or 0.0, g.method != "dense",
                                                  g.method))


def markdown_summary(runs: list[RunResult]) -> str:
    """Mean and standard deviation of the test perplexity over seeds, per layer type, method and target."""
    lines = ["| layer type | method | target | seeds | test ppl (mean ± std) | params (non-embedding) | "
             "heads per layer (each seed) |", "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for g in summarize(runs):
        target = f"{g.target_sparsity:.0%}" if g.target_sparsity else ""
        layouts = "; ".join(",".join(map(str, r.heads_per_layer)) for r in sorted(g.runs, key=lambda r: r.seed or 0))
        lines.append(f"| {g.layer_type} | {g.method} | {target} | {len(g.runs)} | {g.ppl_mean:.1f} ± {g.ppl_std:.1f} "
                     f"| {g.params_mean:,.0f} | {layouts} |")
    return "\n".join(lines)


def markdown_method_differences(runs: list[RunResult], reference: str = "gates") -> str:
    """Per layer type and target, the test-ppl difference of each other pruning method to ``reference``,
    paired by seed (both pruned from the same dense model): mean ± std over the seeds both have."""
    by_key = {(r.layer_type, r.method, r.target_sparsity, r.seed): r.test_ppl for r in runs if r.role == "pruned"}
    lines = [f"| layer type | target | method | seeds | ppl(method) - ppl({reference}) (mean ± std) |",
             "| --- | ---: | --- | ---: | ---: |"]
    groups = sorted({k[:3] for k in by_key if k[1] != reference}, key=lambda g: (g[0], g[2], g[1]))
    for layer_type, method, target in groups:
        diffs = [ppl - by_key[(lt, reference, t, seed)] for (lt, m, t, seed), ppl in sorted(by_key.items())
                 if (lt, m, t) == (layer_type, method, target) and (lt, reference, t, seed) in by_key]
        if not diffs:
            continue
        mean = sum(diffs) / len(diffs)
        std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)) if len(diffs) > 1 else 0.0
        lines.append(f"| {layer_type} | {target:.0%} | {method} | {len(diffs)} | {mean:+.1f} ± {std:.1f} |")
    return "\n".join(lines)


def plot_perplexity_vs_parameters(runs: list[RunResult], path: Path) -> None:
    """Test perplexity against non-embedding parameters (the Pareto view): one line per layer type and pruning
    method, starting at the dense model; points are means over seeds, error bars one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = summarize(runs)
    colours = {"all_attention": "tab:blue", "transformer_xl": "tab:orange"}
    styles = {"gates": ("o", "-"), "random": ("^", ":"), "importance": ("s", "--")}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for layer_type in sorted({g.layer_type for g in groups}):
        dense = [g for g in groups if g.layer_type == layer_type and g.method == "dense"]
        methods = sorted({g.method for g in groups if g.layer_type == layer_type and g.method != "dense"}) or ["dense"]
        for method in methods:
            line = dense + sorted((g for g in groups if g.layer_type == layer_type and g.method == method
                                   and g.method != "dense"), key=lambda g: -g.params_mean)
            marker, style = styles.get(method, ("o", "-"))
            ax.errorbar([g.params_mean / 1e6 for g in line], [g.ppl_mean for g in line],
                        yerr=[g.ppl_std for g in line], marker=marker, linestyle=style, capsize=3,
                        color=colours.get(layer_type), label=f"{layer_type} {method}")
            for g in line:
                if method == methods[0] or g.method != "dense":
                    label = f"{g.target_sparsity:.0%}" if g.target_sparsity else "dense"
                    ax.annotate(label, (g.params_mean / 1e6, g.ppl_mean), fontsize=6, textcoords="offset points",
                                xytext=(4, 4))
    ax.set_xlabel("non-embedding parameters (M)")
    ax.set_ylabel("test perplexity")
    ax.set_title("perplexity vs parameters (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def validation_curve(folder: Path) -> list[tuple[int, float]]:
    """(step, val/ppl) of every validation the run's fit logged (its CSV log outside ``test/`` and ``validate/``),
    and, when ``validate/`` holds one, the validation of its final model, placed at the run's last step."""
    points = []
    for path in sorted(folder.glob("**/metrics.csv")):
        if (folder / "test") in path.parents or (folder / "validate") in path.parents:
            continue
        with path.open() as f:
            points += [(int(row["step"]), float(row["val/ppl"])) for row in csv.DictReader(f) if row.get("val/ppl")]
    final = sorted((folder / "validate").glob("**/metrics.csv"))
    if final and (folder / RUN_FILE).is_file():
        steps = json.loads((folder / RUN_FILE).read_text())["steps"]
        points = [p for p in points if p[0] < steps] + [(steps, last_metrics(final[-1])["val/ppl"])]
    return sorted(points)


def plateau_gain(curve: list[tuple[int, float]]) -> float:
    """Relative validation-perplexity improvement over the last 20% of training: ppl at the last validation at
    or before 80% of the final step over the final ppl, minus 1 (NaN without two points)."""
    if len(curve) < 2:
        return math.nan
    last_step, last_ppl = curve[-1]
    earlier = [ppl for step, ppl in curve if step <= 0.8 * last_step]
    return earlier[-1] / last_ppl - 1 if earlier else math.nan


def plot_learning_curves(runs: list[RunResult], path: Path) -> None:
    """Validation perplexity against step of every dense run (one line per layer type and seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in runs:
        curve = validation_curve(r.folder) if r.role == "dense" and r.folder else []
        if curve:
            ax.plot([c[0] for c in curve], [c[1] for c in curve], marker=".", label=f"{r.name}",
                    linestyle="-" if r.layer_type == "all_attention" else "--")
    ax.set_xlabel("step")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.set_title("dense baselines: learning curves")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown_plateaus(runs: list[RunResult]) -> str:
    """Each dense run's final validation perplexity and its improvement over the last 20% of its steps."""
    lines = ["| dense run | steps | final val ppl | improvement over the last 20% |", "| --- | ---: | ---: | ---: |"]
    for r in runs:
        curve = validation_curve(r.folder) if r.role == "dense" and r.folder else []
        if curve:
            lines.append(f"| {r.name} | {curve[-1][0]} | {curve[-1][1]:.1f} | {100 * plateau_gain(curve):.1f}% |")
    return "\n".join(lines)


def plot_head_map(head_map_csv: Path, path: Path, title: str) -> None:
    """The last validation's head map of a pruning run: log_alpha per layer and head, removed heads blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    with head_map_csv.open() as f:
        rows = list(csv.DictReader(f))
    last = max(int(r["step"]) for r in rows)
    rows = [r for r in rows if int(r["step"]) == last]
    n_layers, n_heads = 1 + max(int(r["layer"]) for r in rows), 1 + max(int(r["head"]) for r in rows)
    grid = np.full((n_layers, n_heads), np.nan)
    for r in rows:
        grid[int(r["layer"]), int(r["head"])] = float(r["log_alpha"])
    fig, ax = plt.subplots(figsize=(1 + 0.5 * n_heads, 1 + 0.4 * n_layers), dpi=120)
    image = ax.imshow(grid, cmap="RdYlGn", vmin=-3, vmax=3, aspect="auto")
    for r in rows:
        if r["state"] == "removed":
            ax.text(int(r["head"]), int(r["layer"]), "x", ha="center", va="center", fontsize=8)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"{title} (step {last}; x = removed)", fontsize=9)
    fig.colorbar(image, ax=ax, label="log alpha")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def generate(root: Path, out: Path | None = None, tested_only: bool = False) -> list[RunResult]:
    """Write ``results.csv``, ``report.md``, ``ppl_vs_params.png``, the dense runs' ``learning_curves.png`` and a
    ``head_map_<run>.png`` per pruning run of the first seed into ``out`` (default ``root``); returns the runs.
    With ``tested_only`` runs not tested yet are left out (a partial report)."""
    out = out or root
    out.mkdir(parents=True, exist_ok=True)
    runs = collect(root, tested_only)
    if not runs:
        raise FileNotFoundError(f"no finished runs ({RUN_FILE}) under {root}")
    write_csv(runs, out / "results.csv")
    plot_perplexity_vs_parameters(runs, out / "ppl_vs_params.png")
    figures = ["ppl_vs_params.png"]
    plateaus = markdown_plateaus(runs)
    if plateaus.count("\n") > 1:
        plot_learning_curves(runs, out / "learning_curves.png")
        figures.append("learning_curves.png")
    first_seed = min((r.seed for r in runs if r.seed is not None), default=None)
    for r in runs:
        maps = list(r.folder.glob("**/head_map.csv")) if r.folder else []
        if r.role == "pruned" and maps and r.seed == first_seed:  # one seed's maps: the layouts are in the table
            plot_head_map(maps[0], out / f"head_map_{r.name}.png", r.name)
            figures.append(f"head_map_{r.name}.png")
    body = [f"# Results of the runs in {root.name}/", "", "## Mean over seeds", "", markdown_summary(runs), "",
            "## Pruning methods against the gates, paired by seed", "", markdown_method_differences(runs), "",
            "## Every run", "", markdown_table(runs), "",
            "test ppl: perplexity on the whole test split; MACs/token: the model's own accounting (layers + full "
            "softmax); eval tokens/s: scored test tokens over the test loop's wall time.", ""]
    if plateaus.count("\n") > 1:
        body += ["## Dense learning curves", "", plateaus, ""]
    body += [f"![{name}]({name})" for name in figures]
    (out / "report.md").write_text("\n".join(body) + "\n")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder holding finished runs")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the runs folder)")
    args = parser.parse_args()
    runs = generate(args.root, args.out)
    print(markdown_table(runs))
    print(f"\nreport: {(args.out or args.root) / 'report.md'}")


if __name__ == "__main__":
    main()
