"""Every ``noqa`` and ``type: ignore`` names what it silences and says why, on its own line.

A bare ``# noqa`` or ``# type: ignore`` hides every finding on the line, today's and the next
one's; with the codes and a reason, a reader can judge whether it still holds. Accepted::

    import torch_npu  # noqa: F401  (registers the "npu" device with torch)
    x = f()  # type: ignore[attr-defined]  # the library's stubs lack it

Checked: every Python file and plugin template in the repository (not .venv or build output).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIPPED_DIRS = {"build", "dist", "site", "node_modules", "__pycache__"}

DIRECTIVE = re.compile(r"#\s*(noqa|type:\s*ignore)\b(.*)$", re.IGNORECASE)
#: ``: E402`` or ``: E402,F401``, then at least one more word
NOQA_WITH_REASON = re.compile(r"^:\s*[A-Z]+[0-9]+(\s*,\s*[A-Z]+[0-9]+)*\s+\S")
#: ``[attr-defined]`` or ``[arg-type, union-attr]``, then at least one more word
IGNORE_WITH_REASON = re.compile(r"^\[[a-z-]+(\s*,\s*[a-z-]+)*\]\s+\S")


def python_files() -> list[Path]:
    files = []
    for path in sorted(ROOT.rglob("*")):
        if not (path.name.endswith(".py") or path.name.endswith(".py.tmpl")) or not path.is_file():
            continue
        parts = path.relative_to(ROOT).parts[:-1]
        if any(part.startswith(".") or part in SKIPPED_DIRS or part.endswith(".egg-info") for part in parts):
            continue
        if path != Path(__file__).resolve():  # this file shows the forms it refuses
            files.append(path)
    return files


def unexplained(line: str) -> bool:
    """Whether the line holds a ``noqa`` or ``type: ignore`` without codes and a reason."""
    match = DIRECTIVE.search(line)
    if match is None:
        return False
    kind, rest = match.group(1).lower(), match.group(2)
    pattern = NOQA_WITH_REASON if kind == "noqa" else IGNORE_WITH_REASON
    return pattern.match(rest) is None


def test_the_rule_tells_a_reason_from_none():
    assert not unexplained("import torch_npu  # noqa: F401  (registers the npu device)")
    assert not unexplained("from x import y  # noqa: E402,F401  (after the importorskip above)")
    assert not unexplained("a.b = 1  # type: ignore[attr-defined]  # the stubs lack it")
    assert not unexplained("x = 1  # a comment about noqa-free code")
    assert unexplained("import os  # noqa")
    assert unexplained("import os  # noqa: F401")
    assert unexplained("a.b = 1  # type: ignore")
    assert unexplained("a.b = 1  # type: ignore[attr-defined]")


def test_every_noqa_and_type_ignore_gives_its_codes_and_a_reason():
    files = python_files()
    assert ROOT / "flowserve_core" / "engine.py" in files
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in files
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if unexplained(line)]
    assert found == [], ("name the codes and say why on the same line, e.g. "
                         "`# noqa: F401  (why)` or `# type: ignore[code]  # why`:\n" + "\n".join(found))
