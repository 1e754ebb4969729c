"""The package's shape holds: no import cycles in attrdist/, and each layer imports only the layers
below it (the functional core imports nothing from the shell). Read from the source with `ast`, every
import counted, lazy ones inside functions too: a cycle through a lazy import is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "attrdist"

# what each part of attrdist may import from attrdist (its own modules always)
FOUNDATION = {"errors", "atomic", "cache", "malloc"}
ALLOWED = {
    "core": {"errors"},
    "data": {"core", "errors", "atomic", "cache", "malloc"},  # cache: where remote shards are kept
    "pack": {"core", "data", "errors", "atomic"},
    "models": {"core", "pack", "errors", "atomic", "cache"},
    "tasks": {"core", "data", "pack", "models", "errors"},
    "train": {"core", "data", "pack", "models", "tasks", *FOUNDATION},
    "demo": {"core", "data", "pack", "models", *FOUNDATION},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every attrdist module `path` imports (`from attrdist.x import y` counts attrdist.x.y when that is a
    module, else attrdist.x)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "attrdist"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "attrdist":
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in MODULES else node.module)
    return out


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}
GRAPH = {m: {i for i in imports_of(p) if i != m and i in MODULES} for m, p in MODULES.items()}


def part(module: str) -> str:
    """attrdist.core.rng -> core; attrdist.errors -> errors; attrdist -> attrdist."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "attrdist"


def test_every_module_is_seen():
    assert {"attrdist.core.order", "attrdist.train.trainer", "attrdist.pack.writer", "attrdist.data.reader"} <= set(GRAPH)
    assert "attrdist.core.config" in GRAPH["attrdist.core.transforms"]  # imports are read, lazy ones too
    assert "attrdist.data.reader" in GRAPH["attrdist.demo.clip_pretrain"]


def test_no_import_cycles():
    """Depth-first search; a back edge is a cycle, reported as the chain of modules."""
    state, stack, cycles = {}, [], []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_layers_import_only_what_is_below_them():
    bad = []
    for m, deps in sorted(GRAPH.items()):
        allowed = ALLOWED.get(part(m))
        if allowed is None:  # top-level modules (cli, recipe, predict, ...) and the foundation
            if part(m) in FOUNDATION:
                bad += [f"{m} imports {d}" for d in deps if part(d) not in FOUNDATION | {"attrdist"}]
            continue
        bad += [f"{m} imports {d} ({part(m)}/ may import only {', '.join(sorted(allowed))})"
                for d in sorted(deps) if part(d) not in allowed | {part(m), "attrdist"}]
    assert not bad, "\n".join(bad)


def test_core_is_pure():
    """core/ holds no I/O, logging or collectives: no logging, no open(), no torch.distributed, no accelerate."""
    bad = []
    for m, p in MODULES.items():
        if part(m) != "core":
            continue
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad += [f"{m} imports {n}" for n in names
                        if n.split(".")[0] in {"logging", "accelerate", "deepspeed", "submitit", "socket", "subprocess"}
                        or n.startswith("torch.distributed")]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in {"open", "print"}:
                bad.append(f"{m}:{node.lineno} calls {node.func.id}()")
    assert not bad, "\n".join(bad)
