"""The package's layout rules (docs/architecture.md): no import circle between its modules, the
method registry does not pull in the training run, and importing registers nothing."""

import ast
import subprocess
import sys
from pathlib import Path

from bundle_runs import REPO

PACKAGE = REPO / "medsaga_components"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports when it is imported (imports inside functions run
    later and cannot close a circle at import time). ``from a import b`` names ``a.b`` when ``b``
    is a module, else ``a``; a module's parents are not counted (Python runs their
    ``__init__`` first, which is no circle unless a parent imports the module back)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.ClassDef):
                visit(node.body)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in (getattr(node, "body", []), getattr(node, "orelse", []), getattr(node, "finalbody", [])):
                    visit(block)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                source = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
    visit(ast.parse(path.read_text()).body)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: top_level_imports(path, set(paths)) for name, path in paths.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                circle = walk(nxt, path + [nxt])
                if circle:
                    return circle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            circle = walk(start, [start])
            if circle:
                return circle
    return None


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert "medsaga_components.inference.two_pass" in graph and graph["medsaga_components.engine"]
    assert find_circle(graph) is None, " -> ".join(find_circle(graph))
    # the checker finds a circle where there is one
    graph["medsaga_components.prompts.kinds"].add("medsaga_components.network")
    assert find_circle(graph)


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                          timeout=300).stdout


def test_the_method_registry_does_not_import_the_training_run_or_inference():
    loaded = run_python("import sys, medsaga_components.methods; "
                        "print(' '.join(m for m in sys.modules if m.startswith('medsaga_components.')))").split()
    assert "medsaga_components.methods" in loaded
    assert not [m for m in loaded if m.split(".")[1] in ("training", "engine", "inference", "evaluation")], loaded


def test_importing_registers_no_writer():
    """``run inference`` registers the atomic NIfTI writer in its ``initialize``; importing the
    package (as MONAI Label and any pipeline do) leaves MONAI's writers as they are."""
    out = run_python("import medsaga_components.engine as e; from monai.data.image_writer import resolve_writer; "
                     "print(resolve_writer('nii.gz')[0].__name__); e.register_atomic_nifti_writer(); "
                     "print(resolve_writer('nii.gz')[0].__name__)").split()
    assert out[0] != "AtomicNibabelWriter" and out[1] == "AtomicNibabelWriter"
