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
