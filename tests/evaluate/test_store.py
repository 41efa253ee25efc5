"""Which evaluation a name or an id names (``medcli audit --evaluation``, the console)."""

from __future__ import annotations

from meddaemon.db.engine import session_factory
from meddaemon.evaluate.store import find_evaluation


def test_an_unknown_name_an_unknown_id_and_a_number_past_an_integer_key_find_nothing(migrated_engine):
    sessions = session_factory(migrated_engine)
    with sessions() as session:
        assert find_evaluation(session, "nightly") is None
        assert find_evaluation(session, "7") is None
        assert find_evaluation(session, "99999999999") is None  # PostgreSQL refused it in the query
