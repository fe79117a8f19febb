"""The layers of docs/architecture.md, read from the code's own imports (no module is run)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CRANE = ROOT / "crane"
LAYERS = {
    0: ("crane.settings", "crane.errors", "crane.files", "crane.device", "crane.logs"),
    1: ("crane.models", "crane.data", "crane.metrics", "crane.losses"),
    2: ("crane.checkpoints", "crane.detector"),
    3: ("crane.engine", "crane.inspection", "crane.export"),
    4: ("crane.cli",),
}
"""Layer of each package or module (``crane.deploy`` and the integrations stand apart: see below)."""


def _modules() -> dict[str, Path]:
    out = {}
    for path in CRANE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _target(name: str) -> str:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str, top_level_only: bool = False) -> set[str]:
    """The crane modules ``module`` imports (anywhere in it, or only at its top level)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                stem = f"{base}.{node.module}" if node.module else base
            else:
                stem = node.module or ""
            names = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {t for t in map(_target, (n for n in names if n.startswith("crane"))) if t and t != module}
    return found


def _layer(module: str) -> int | None:
    for layer, prefixes in LAYERS.items():
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    return None


def test_nothing_imports_upward():
    upward = []
    for module in MODULES:
        mine = _layer(module)
        for target in _imports(module):
            theirs = _layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module} (layer {mine}) imports {target} (layer {theirs})")
    assert upward == []


def test_only_the_command_line_imports_the_command_line():
    outside = [f"{m} imports {t}" for m in MODULES if not m.startswith("crane.cli") and m != "crane.__main__"
               for t in _imports(m) if t.startswith("crane.cli")]
    assert outside == []


def test_no_import_circles():
    edges = {m: _imports(m, top_level_only=True) for m in MODULES}
    loops, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges.get(node, ()):
            if nxt.startswith(node + "."):  # a package importing its own submodule
                continue
            if state.get(nxt) == 1:
                loops.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in edges:
        if module not in state:
            visit(module, [module])
    assert loops == []


def test_deploy_imports_neither_torch_nor_argparse_nor_the_model_side():
    for module, path in MODULES.items():
        if not module.startswith("crane.deploy"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
        names |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                  and not node.level}
        assert not names & {"torch", "argparse", "open_clip", "timm"}, module
        allowed = ("crane.deploy", "crane.errors", "crane.data.image")  # image decoding is torch-free on import
        assert all(t.startswith(allowed) for t in _imports(module)), (module, _imports(module))


def test_integrations_are_leaves():
    users = [f"{m} imports {t}" for m in MODULES if not m.startswith("crane.integrations")
             and not m.startswith("crane.cli") for t in _imports(m) if t.startswith("crane.integrations")]
    assert users == []


def test_a_model_setting_is_named_only_by_the_declaration_and_the_model():
    """The declaration, the model that computes with it, and anomalib's class (whose constructor must spell
    out its arguments for anomalib's config-file command line)."""
    files = sorted(str(p.relative_to(ROOT)) for p in CRANE.rglob("*.py")
                   if "both_eattn_dattn" in p.read_text(encoding="utf-8"))
    assert files == ["crane/integrations/anomalib.py", "crane/models/crane.py", "crane/settings.py"]
