"""Greedy generation of the working tree's model against the model of an earlier commit, side by side in one process.

``git archive REV lightning_modules`` is unpacked into a temporary folder as a package of another name (its own
imports renamed to it), both versions build the W1 model (All-attention) with the same weights (one state dict), dense
and with half of every layer's heads removed, must generate the same tokens, and are timed in interleaved rounds:
the figure is what a change made to a generation step, free of the drift between separate runs.

    python -m experiments.benchmarks.against_revision --rev 3316ad9 [--batch 1] [--tokens 64] [--repeats 15]
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path
from types import ModuleType

import torch

from experiments.benchmarks.options import apply_machine_options, machine_parser
from experiments.benchmarks.reporting import emit
from experiments.benchmarks.timing import interleaved_medians
from experiments.benchmarks.workloads import W1, W1_NAME, build

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "lightning_modules"


def load_revision(rev: str, folder: Path) -> ModuleType:
    """The ``lightning_modules.model`` package of commit ``rev``, unpacked under ``folder`` as ``lm_<sha>.model``."""
    sha = subprocess.run(["git", "rev-parse", "--short", f"{rev}^{{commit}}"], cwd=REPO, capture_output=True,
                         text=True)
    if sha.returncode != 0:
        raise SystemExit(f"{rev!r} is not a commit of {REPO}: pass --rev a commit, tag or branch (git log lists them)")
    name = f"lm_{sha.stdout.strip()}"
    archive = subprocess.run(["git", "archive", sha.stdout.strip(), PACKAGE], cwd=REPO, capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"commit {rev} has no {PACKAGE}/ to compare against: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")
    (folder / PACKAGE).rename(folder / name)
    own_imports = re.compile(rf"\b{PACKAGE}(?=[. ])")
    for source in (folder / name).rglob("*.py"):
        source.write_text(own_imports.sub(name, source.read_text()))
    sys.path.insert(0, str(folder))
    return importlib.import_module(f"{name}.model")


def main() -> None:
    parser = machine_parser(__doc__, repeats=15)
    parser.add_argument("--rev", required=True, help="the commit to compare the working tree against")
    parser.add_argument("--batch", type=int, default=1, help="rows generated at once")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per row and timed call")
    args = parser.parse_args()
    extra = apply_machine_options(args)
    prompt = torch.randint(0, W1["vocab_size"], (args.batch, 1), generator=torch.Generator().manual_seed(0))
    fns = {}
    with tempfile.TemporaryDirectory() as folder:
        earlier = load_revision(args.rev, Path(folder))
        for removed in (0.0, 0.5):
            now = build("all_attention", removed).eval()
            then = earlier.MemoryTransformerLM(layer_type="all_attention", **W1)
            then.shrink_to(now.heads_per_layer)
            try:
                then.load_state_dict(now.state_dict())
            except RuntimeError as error:
                raise SystemExit(f"the model of {args.rev} does not take today's weights: "
                                 f"{str(error).splitlines()[0]}") from None
            then.eval()
            for version, model in (("working tree", now), (args.rev, then)):
                fns[(removed, version)] = lambda model=model: model.generate(prompt, args.tokens, temperature=0)
            if not torch.equal(fns[(removed, "working tree")](), fns[(removed, args.rev)]()):
                raise SystemExit(f"greedy tokens differ from those of {args.rev} at heads_removed={removed}")
        t = interleaved_medians(fns, args.repeats)
    for (removed, version), seconds in t.items():
        emit(W1_NAME, "generate_ms_per_step", round(1e3 * seconds / args.tokens, 3), "ms", version=version,
             batch=args.batch, heads_removed=removed, **extra)
    for removed in (0.0, 0.5):
        emit(W1_NAME, "generate_speedup_over_revision", round(t[(removed, args.rev)] / t[(removed, "working tree")], 2),
             "x", rev=args.rev, batch=args.batch, heads_removed=removed, **extra)


if __name__ == "__main__":
    main()
