"""The repository stands alone: nothing in it cites the developers' notes outside it (a user's clone lacks them)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE_NOTE = re.compile(r"(\.\./)?" + "sha" + r"red/[A-Z]+\.md")  # built so that this file does not match itself


def test_no_file_cites_notes_outside_the_repository():
    files = [p for d in ("swarm_node", "docs", "protocols", "benchmarks", "tests", "scripts") for p in (ROOT / d).rglob("*")
             if p.is_file() and p.suffix in {".py", ".md", ".sh", ".toml", ".yml", ".txt"}]
    files += [ROOT / "README.md", ROOT / "pyproject.toml"]
    assert len(files) > 50  # the walk found the repository
    cited = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files for m in OUTSIDE_NOTE.finditer(p.read_text())]
    assert cited == []


def test_no_undefined_names_in_the_package():
    """An undefined name in a rarely taken branch only fails when that branch runs: `averager.py` raised
    `AllreduceException` without importing it, so every all-reduce failure surfaced as a NameError."""
    from pyflakes import api, messages, reporter

    class Collect(reporter.Reporter):
        def __init__(self):
            super().__init__(None, None)
            self.found = []

        def flake(self, message):
            if isinstance(message, (messages.UndefinedName, messages.UndefinedExport, messages.UndefinedLocal)):
                self.found.append(str(message))

        def syntaxError(self, filename, msg, lineno, offset, text):
            self.found.append(f"{filename}:{lineno}: {msg}")

        def unexpectedError(self, filename, msg):
            self.found.append(f"{filename}: {msg}")

    collected = Collect()
    paths = [str(p) for d in ("swarm_node", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    assert len(paths) > 50  # the walk found the package
    for path in paths:
        api.checkPath(path, collected)
    assert collected.found == []
