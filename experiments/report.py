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
RESULT_FIELDS = ("name", "layer_type", "role", "target_sparsity", "test_ppl", "params_total", "params_non_embedding",
                 "macs_per_token", "heads", "heads_per_layer", "tokens_per_s", "steps")


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
        steps=meta.get("steps"), folder=folder,
    )


def collect(root: Path) -> list[RunResult]:
    """Every dense and pruned run under ``root`` (any depth; learning-rate sweep runs are left out), dense
    before pruned, then by name."""
    folders = [path.parent for path in sorted(root.glob(f"**/{RUN_FILE}"))]
    runs = [read_run(f) for f in folders if json.loads((f / RUN_FILE).read_text())["role"] in ("dense", "pruned")]
    return sorted(runs, key=lambda r: (r.layer_type, r.role != "dense", r.target_sparsity or 0.0, r.name))


def markdown_table(runs: list[RunResult]) -> str:
    """The results as a Markdown table, with each pruned model's cost against its architecture's dense one."""
    dense = {r.layer_type: r for r in runs if r.role == "dense"}
    lines = ["| model | layer type | target | heads per layer | test ppl | ppl vs dense | params (total) | "
             "params (non-embedding) | MACs/token | eval tokens/s | speed-up |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in runs:
        base = dense.get(r.layer_type)
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


def plot_perplexity_vs_parameters(runs: list[RunResult], path: Path) -> None:
    """Test perplexity against non-embedding parameters, one line per layer type (the Pareto view)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for layer_type, marker in (("all_attention", "o"), ("transformer_xl", "s")):
        points = sorted((r.params_non_embedding / 1e6, r.test_ppl, r) for r in runs if r.layer_type == layer_type)
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=layer_type)
        for x, y, r in points:
            ax.annotate(f"{r.target_sparsity:.0%}" if r.target_sparsity else "dense", (x, y), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("non-embedding parameters (M)")
    ax.set_ylabel("test perplexity")
    ax.set_title("perplexity vs parameters")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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


def generate(root: Path, out: Path | None = None) -> list[RunResult]:
    """Write ``results.csv``, ``report.md``, ``ppl_vs_params.png`` and a ``head_map_<run>.png`` per pruning run
    into ``out`` (default ``root``); returns the runs."""
    out = out or root
    out.mkdir(parents=True, exist_ok=True)
    runs = collect(root)
    if not runs:
        raise FileNotFoundError(f"no finished runs ({RUN_FILE}) under {root}")
    write_csv(runs, out / "results.csv")
    plot_perplexity_vs_parameters(runs, out / "ppl_vs_params.png")
    figures = ["ppl_vs_params.png"]
    for r in runs:
        maps = list(r.folder.glob("**/head_map.csv")) if r.folder else []
        if r.role == "pruned" and maps:
            plot_head_map(maps[0], out / f"head_map_{r.name}.png", r.name)
            figures.append(f"head_map_{r.name}.png")
    body = [f"# Results from {root}", "", markdown_table(runs), "",
            "test ppl: perplexity on the whole test split; MACs/token: the model's own accounting (layers + full "
            "softmax); eval tokens/s: scored test tokens over the test loop's wall time.", ""]
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
