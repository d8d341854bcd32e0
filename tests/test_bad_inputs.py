"""The bad-input corpus (tests/bad_inputs.py): each case is handled right or refused with the file named."""

from __future__ import annotations

import pytest

from tests.bad_inputs import all_cases

CASES = {c.name: c for c in all_cases()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tmp_path):
    case = CASES[name]
    detail = case.run(tmp_path)
    if case.expect == "refused":
        assert detail, "a refusal must state the problem"
