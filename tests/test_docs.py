"""The docstring examples run: ``--doctest-modules`` over ``src`` in the default test run, few skipped.

Examples that need minutes (fits on her2st, whole-slide features) carry ``# doctest: +SKIP`` and a
cheap runnable example beside them; at most a quarter of all examples may be skipped.
"""

from __future__ import annotations

import doctest
import functools
import importlib
import pkgutil
import tomllib
from pathlib import Path

import pytest

import sigmma_sc

MAX_SKIPPED = 0.25
ROOT = Path(__file__).resolve().parents[1]


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(sigmma_sc.__path__, "sigmma_sc."))


@functools.cache
def _examples() -> dict[str, tuple[int, int]]:
    """``{module: (examples, skipped)}`` over every module of the package (``>>>`` statements)."""
    finder = doctest.DocTestFinder()
    out = {}
    for name in _modules():
        module = importlib.import_module(name)
        n = skipped = 0
        for test in finder.find(module, name):
            for ex in test.examples:
                n += 1
                skipped += bool(ex.options.get(doctest.SKIP))
        out[name] = (n, skipped)
    return out


def test_at_most_a_quarter_of_the_examples_is_skipped():
    counts = _examples()
    total = sum(n for n, _ in counts.values())
    skipped = sum(s for _, s in counts.values())
    assert total >= 400, f"only {total} docstring examples found: the finder misses modules?"
    worst = sorted(((s, m) for m, (_, s) in counts.items() if s), reverse=True)[:5]
    assert skipped <= MAX_SKIPPED * total, (
        f"{skipped} of {total} docstring examples ({skipped / total:.0%}) are skipped (at most {MAX_SKIPPED:.0%}); "
        f"most skips: {worst}. Add a cheap runnable example (synthetic data, the namespace of src/conftest.py)."
    )


def test_skip_count_sees_skips():
    # The count above is real: a docstring with skipped examples is counted as such.
    finder = doctest.DocTestFinder()

    def f():
        """Doc.

        >>> 1 + 1
        2
        >>> slow()  # doctest: +SKIP
        >>> slower()  # doctest: +SKIP
        """

    (test,) = finder.find(f, "f", globs={})
    assert [bool(ex.options.get(doctest.SKIP)) for ex in test.examples] == [False, True, True]


def test_doctests_run_by_default():
    opts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--doctest-modules" in opts["addopts"]
    assert "src" in opts["testpaths"] and "tests" in opts["testpaths"]


@pytest.mark.parametrize("name", ["sigmma_sc.tl._fit", "sigmma_sc.model._sigmma", "sigmma_sc.pp._features"])
def test_main_entry_points_have_runnable_examples(name):
    n, skipped = _examples()[name]
    assert n > skipped, f"{name}: every example is skipped"


# ---------------------------------------------------------------------------------------------
# Tutorials: committed executed (scripts/run_tutorials.py), small, free of machine paths
# ---------------------------------------------------------------------------------------------
TUTORIALS = sorted((ROOT / "tutorials").glob("*.ipynb"))
MAX_NOTEBOOK_MB = 3.0
MACHINE_PATHS = ("/work/", "/home/", "/root/", "/Users/", "/tmp/", "shared/data/her2st/")


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorials_are_executed_small_and_free_of_machine_paths(path):
    import json

    assert path.stat().st_size < MAX_NOTEBOOK_MB * 1e6, f"{path.name}: {path.stat().st_size / 1e6:.1f} MB"
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert cells and all(c["execution_count"] for c in cells), f"{path.name}: not executed (scripts/run_tutorials.py)"
    counts = [c["execution_count"] for c in cells]
    assert counts == list(range(1, len(cells) + 1)), f"{path.name}: cells ran out of order {counts}"
    for i, cell in enumerate(cells):
        source = "".join(cell["source"])
        # The package filters the import-time noise of its dependencies itself, once.
        assert "filterwarnings" not in source, f"{path.name} cell {i}: warning filter in a tutorial"
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", f"{path.name} cell {i}: {out.get('ename')}"
            text = "".join(out.get("text", "")) + "".join(out.get("data", {}).get("text/plain", ""))
            assert not [p for p in MACHINE_PATHS if p in text], f"{path.name} cell {i}: {text[:300]}"
            if out.get("name") == "stderr":
                assert "Warning" not in text, f"{path.name} cell {i}: {text[:300]}"
