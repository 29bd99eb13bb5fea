"""The code's shape stays what a newcomer can read: small modules, classes and functions, imports one way, and no
hidden surgery on transformers' objects."""
from __future__ import annotations

import ast
from pathlib import Path

import torch
import transformers

import hermes

SRC = Path(hermes.__file__).parent
MAX_MODULE, MAX_CLASS, MAX_FUNCTION = 400, 250, 60


def _modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        name = ".".join(("hermes", *f.relative_to(SRC).with_suffix("").parts))
        out[name.removesuffix(".__init__")] = f
    return out


def test_no_module_class_or_function_above_its_size():
    over = []
    for name, f in _modules().items():
        text = f.read_text()
        if len(text.splitlines()) > MAX_MODULE:
            over.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            size = (node.end_lineno or node.lineno) - node.lineno + 1 if hasattr(node, "lineno") else 0
            if isinstance(node, ast.ClassDef) and size > MAX_CLASS:
                over.append(f"{name}.{node.name}: class of {size} lines")
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and size > MAX_FUNCTION:
                over.append(f"{name}.{node.name}: function of {size} lines")
    assert not over, over


def test_module_level_imports_have_no_cycle():
    """Imports a module runs when it is imported (module level, outside ``if TYPE_CHECKING``) flow one way; a
    package's ``__init__`` re-exporting its own modules is not a cycle."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hermes"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    graph[m].add(sub if sub in mods else node.module)
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name.startswith("hermes"))
    for m in graph:  # a package imports its submodules to re-export them: not an edge back
        graph[m] = {t for t in graph[m] if t in mods and not t.startswith(m + ".")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in graph[m]:
            assert state.get(t) != 1, f"import cycle: {' -> '.join(path[path.index(t):] + [t])}"
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


def test_a_streamed_model_is_its_transformers_class_with_nothing_patched(tiny_models):
    model = hermes.load(tiny_models["tiny-gpt2"], budget="10MiB")
    assert isinstance(model, transformers.GPT2LMHeadModel) and type(model).__name__ == "GPT2LMHeadModel"
    assert model.device == torch.device("cpu")  # its parameters are on meta between calls
    assert "generate" not in vars(model) and "__class__" not in vars(model)  # methods of its class, not patches
    assert not [n for m in model.modules() for n in vars(m) if n.startswith("_hermes")]
    assert model.hermes.layout.path == Path(tiny_models["tiny-gpt2"])
    bert = hermes.load(tiny_models["tiny-bert"], budget="10MiB")
    assert not hasattr(bert, "generate") or not bert.can_generate()  # no generate grafted onto an encoder
