"""Every broken or hostile input of the corpus (tests/helpers/broken_inputs.py) through every command
that reads adapters: each run ends in time, exits non-zero with exactly one error line (or succeeds
with an output lorareg reads back), prints no traceback, internal error or library warning, leaves
nothing behind, and never changes the input."""

from __future__ import annotations

from collections import defaultdict

import pytest

from tests.helpers.broken_inputs import CASES, RunResult, check_case, warm_up

BY_CATEGORY: dict[str, list] = defaultdict(list)
for _case in CASES:
    BY_CATEGORY[_case.category].append(_case)


def test_the_corpus_covers_every_class_of_the_issue():
    assert set(BY_CATEGORY) >= {"header", "huge numbers", "non-finite", "deep nesting", "metadata JSON", "PEFT types",
                                "catastrophic regex", "special files", "terminal", "encoding", "names", "shapes",
                                "accepted then refused", "keys", "pickle", "size", "families"}
    assert len(CASES) >= 120


@pytest.mark.parametrize("category", sorted(BY_CATEGORY))
def test_broken_inputs_through_every_command(category, lorareg, tmp_path, one_thread):
    warm_up()

    def run(*args) -> RunResult:
        result = lorareg(*args)
        return RunResult(result.code, result.out, result.err)

    failures = []
    for number, item in enumerate(BY_CATEGORY[category]):
        _, found = check_case(item, run, tmp_path / f"{number:03d}", limit=20.0)
        failures += found
    assert not failures, "\n".join(str(f) for f in failures)
