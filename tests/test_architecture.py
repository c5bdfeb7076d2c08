"""The layers of the tree, checked on the source: which package may import which (docs/design.md#layers)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the layers, most specific first (a module belongs to the first prefix it starts with)
LAYERS = ("lightning_modules.model", "lightning_modules.training", "lightning_modules.cli", "lightning_modules.export",
          "lightning_modules", "datamodules", "callbacks", "experiments")
COMMAND = {"lightning_modules.model", "lightning_modules.training", "lightning_modules", "datamodules", "callbacks"}
# what each layer may import from the others; the commands (the headprune CLI, the export command) are the
# composition roots below experiments, and the modules at the top of lightning_modules (the user-error type) are
# leaves every layer of it may use
ALLOWED = {
    "lightning_modules": set(),
    "lightning_modules.model": {"lightning_modules"},
    "datamodules": set(),
    "lightning_modules.training": {"lightning_modules", "lightning_modules.model", "datamodules.atomic"},
    "callbacks": {"lightning_modules", "lightning_modules.model"},
    "lightning_modules.cli": COMMAND,
    "lightning_modules.export": COMMAND,
    "experiments": set(LAYERS) - {"experiments"},
}
FRAMEWORKS = ("pytorch_lightning", "lightning", "lightning_fabric", "torchmetrics")


def layer_of(module: str) -> str | None:
    for layer in LAYERS:
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of the file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def source_files() -> list[Path]:
    roots = ("lightning_modules", "datamodules", "callbacks", "experiments")
    return sorted(p for root in roots for p in (REPO / root).rglob("*.py"))


def test_every_package_imports_only_the_layers_below_it():
    violations = []
    for path in source_files():
        own = layer_of(module_name(path))
        for target in imports(path):
            other = layer_of(target)
            if other is None or other == own:
                continue
            allowed = ALLOWED[own]
            if other not in allowed and target not in allowed:
                violations.append(f"{module_name(path)} imports {target}")
    assert not violations, "\n".join(violations)


def test_the_layer_graph_has_no_cycle():
    edges: dict[str, set[str]] = {layer: set() for layer in LAYERS}
    for path in source_files():
        own = layer_of(module_name(path))
        edges[own] |= {layer_of(t) for t in imports(path) if layer_of(t) not in (None, own)}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in edges[node]:
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = "done"

    for layer in LAYERS:
        if layer not in state:
            visit(layer, [])


def test_the_model_and_the_data_know_nothing_of_lightning_training():
    model_files = sorted((REPO / "lightning_modules" / "model").rglob("*.py"))
    assert model_files
    for path in model_files:
        frameworks = {t for t in imports(path) if t.split(".")[0] in FRAMEWORKS}
        assert not frameworks, f"{module_name(path)} imports {frameworks}: the model is plain PyTorch"


def test_the_documented_import_path_of_the_model_holds():
    from lightning_modules.model import MemoryTransformerLM, ModelConfig

    model = MemoryTransformerLM(vocab_size=50, n_layers=1, d_model=16, n_heads=2, d_head=8, n_persistent=4,
                                tgt_len=4, mem_len=4, cutoffs=[], max_len=16)
    assert isinstance(model.config, ModelConfig) and model.config.n_layers == 1
