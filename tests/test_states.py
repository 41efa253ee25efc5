"""The life of a scan: which states follow which (docs/design.md section 3)."""

import itertools

import pytest

from meddaemon.states import PERSISTED, SETTLED, IllegalTransition, ScanState, check_transition

S = ScanState


@pytest.mark.parametrize(
    "path",
    [
        [S.DISCOVERED, S.STABLE, S.REGISTERED, S.ROUTED, S.INFERRED, S.REPORTED, S.ARCHIVED],
        [S.DISCOVERED, S.STABLE, S.REGISTERED, S.ROUTED, S.WAITING_MODEL, S.ROUTED, S.INFERRED],
        [S.DISCOVERED, S.STABLE, S.REGISTERED, S.FAILED],
    ],
)
def test_the_documented_lives_of_a_scan_are_legal(path):
    for current, new in itertools.pairwise(path):
        check_transition(current, new)


@pytest.mark.parametrize(
    ("current", "new"),
    [(S.ARCHIVED, S.ROUTED), (S.FAILED, S.ROUTED), (S.REGISTERED, S.INFERRED), (S.REPORTED, S.FAILED)],
)
def test_no_state_is_skipped_and_terminal_states_stay(current, new):
    with pytest.raises(IllegalTransition):
        check_transition(current, new)


def test_only_states_after_registration_are_stored():
    assert S.DISCOVERED not in PERSISTED and S.STABLE not in PERSISTED
    assert SETTLED <= PERSISTED
