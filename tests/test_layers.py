"""The package diagram in docs/architecture.md is the code's: its import block lists exactly the imports between
swarm_node's packages (and top-level modules), and the imports go one way (no cycle) apart from the known one."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# learning/tasks.py encodes task specs with network/wire.py's structs while network/ verifies with learning/'s
# verifier: the lower-layer half of issue 13 (docs/architecture.md, "Findings of issue 13") owns this pair
KNOWN_CYCLE_EDGES = {("learning", "network")}


def unit(module: str) -> str | None:
    """The diagram's box of a dotted module name: a package (network/merging apart) or a top-level module."""
    parts = module.split(".")
    if parts[0] != "swarm_node" or len(parts) == 1:
        return None
    if parts[1] == "network" and len(parts) > 2 and parts[2] == "merging":
        return "network/merging"
    return parts[1]


def code_imports() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in (ROOT / "swarm_node").rglob("*.py"):
        src = unit(".".join(path.relative_to(ROOT).with_suffix("").parts))
        if src is None:  # swarm_node/__init__.py
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] if unit(node.module) else [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                dst = unit(name)
                if dst and dst != src:
                    edges[src].add(dst)
    return edges


def documented_imports() -> dict[str, set[str]]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"<!-- imports: begin -->\n```\n(.*?)```\n<!-- imports: end -->", text, re.S)
    assert block, "docs/architecture.md lost its imports block"
    edges = {}
    for line in block.group(1).splitlines():
        src, _, dsts = line.partition("->")
        edges[src.strip()] = {d.strip() for d in dsts.split(",") if d.strip()}
    return edges


def test_the_documented_package_imports_are_the_codes():
    code = code_imports()
    expected = "\n".join(f"{s} -> {', '.join(sorted(code[s]))}" for s in sorted(code))
    assert documented_imports() == dict(code), f"update the imports block of docs/architecture.md to:\n{expected}"


def test_imports_go_one_way():
    edges = {s: {d for d in ds if (s, d) not in KNOWN_CYCLE_EDGES} for s, ds in code_imports().items()}
    seen, stack = set(), []

    def visit(u):
        assert u not in stack, f"import cycle: {' -> '.join(stack[stack.index(u):] + [u])}"
        if u in seen:
            return
        stack.append(u)
        for v in edges.get(u, ()):
            visit(v)
        stack.pop()
        seen.add(u)

    for u in list(edges):
        visit(u)
