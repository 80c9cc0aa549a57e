"""The imports of a Python file, for the tests that hold plugins to the public API."""

from __future__ import annotations

import ast
from pathlib import Path


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, module.name)`` of every absolute import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return found
