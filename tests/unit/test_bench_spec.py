"""`tandem bench spec` drafter entries: NAME, NAME:fixed, NAME:fixed=N."""

from __future__ import annotations

import pytest

from benchmarks.spec import parse_entry
from services.runtime.errors import InvalidRequestError


def test_entries_name_the_drafter_its_speculation_mode_and_node_budget():
    assert parse_entry("lookahead", 32) == ("lookahead", "auto", 32)
    assert parse_entry("auto:fixed", 32) == ("auto", "fixed", 32)
    assert parse_entry("auto:fixed=16", 32) == ("auto", "fixed", 16)


@pytest.mark.parametrize("bad", ["auto:sometimes", "none:fixed", "auto:fixed=0", "auto:fixed=x", "auto:fixed="])
def test_a_bad_entry_is_refused_naming_it(bad):
    with pytest.raises(InvalidRequestError, match="drafters"):
        parse_entry(bad)
