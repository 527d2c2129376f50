"""Build a wheel and an sdist of every FlowServe distribution into one wheelhouse.

    python scripts/build_dists.py build/wheelhouse

Every distribution is the kernel (the repository root) and each ``plugins/*/`` and ``contrib/*/``
directory with a ``pyproject.toml`` (``tests/fixture_plugin`` is not published). Builds run
without isolation, in this interpreter: it needs ``build`` and ``setuptools>=77`` (the test
extra has both), and no network."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def distribution_dirs() -> list[Path]:
    """The directories of every published distribution, the kernel first."""
    return [ROOT, *sorted(d for group in ("plugins", "contrib") for d in (ROOT / group).iterdir()
                          if (d / "pyproject.toml").is_file())]


def build_all(out: Path) -> list[Path]:
    """Build each distribution into ``out`` (emptied first); the files made, sorted."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for directory in distribution_dirs():
        result = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel",
                                 "--outdir", str(out), str(directory)], capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"building {directory.relative_to(ROOT) or '.'} failed:\n{result.stdout[-3000:]}"
                             f"{result.stderr[-3000:]}")
        _remove_scratch(directory / "build", keep=out)
    return sorted(out.iterdir())


def _remove_scratch(build_dir: Path, keep: Path) -> None:
    """setuptools' scratch copies of the packages (``build/lib``, ``build/bdist.*``): left in
    place they would be found by every grep and tool that walks the tree."""
    for entry in build_dir.glob("*") if build_dir.is_dir() else []:
        if entry.resolve() != keep.resolve() and (entry.name == "lib" or entry.name.startswith("bdist.")):
            shutil.rmtree(entry)
    if build_dir.is_dir() and not any(build_dir.iterdir()):
        build_dir.rmdir()


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "build/wheelhouse")
    made = build_all(target)
    print(f"{len(made)} files in {target}")
