"""The schema is created and upgraded by Alembic, identically to the models, on SQLite and PostgreSQL."""

import re
import subprocess
import sys
import time
from subprocess import PIPE

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from meddaemon.db.engine import create_db_engine
from meddaemon.db.migrate import (
    DatabaseMissing,
    ForeignDatabase,
    SchemaTooNew,
    SchemaTooOld,
    current_revision,
    database_location,
    head_revision,
    open_current,
    require_current,
    upgrade,
)
from meddaemon.db.models import Base


def test_upgrade_creates_every_table_at_head(migrated_engine):
    assert current_revision(migrated_engine) == head_revision()
    tables = set(inspect(migrated_engine).get_table_names())
    assert {"scans", "scan_events", "duplicate_arrivals", "tasks", "model_versions", "results"} <= tables


def test_migrations_and_models_agree(migrated_engine):
    with migrated_engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_upgrade_twice_is_harmless(migrated_engine):
    upgrade(migrated_engine)
    assert current_revision(migrated_engine) == head_revision()


def test_a_database_from_a_newer_meddaemon_is_refused_naming_it(migrated_engine, db_url):
    with migrated_engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    where = re.escape(database_location(db_url))
    with pytest.raises(SchemaTooNew, match=f"at {where} is at revision 9999, which this meddaemon does not know"):
        upgrade(migrated_engine)


def test_the_same_bytes_can_be_failed_any_number_of_times_but_live_only_once(migrated_engine):
    """``uq_scans_sha256_live``, as the migrations build it: a retry's new attempt sits beside the
    failed ones, a second live scan of the same bytes is refused."""
    insert = text(
        "INSERT INTO scans (sha256, state, source_name, registered_at, updated_at) "
        "VALUES (:sha, :state, 'synthetic.png', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
    )
    with migrated_engine.begin() as conn:
        for state in ("failed", "failed", "routed"):
            conn.execute(insert, {"sha": "ab" * 32, "state": state})
    with pytest.raises(IntegrityError), migrated_engine.begin() as conn:
        conn.execute(insert, {"sha": "ab" * 32, "state": "waiting_model"})


def test_open_current_opens_a_database_at_head(migrated_engine, db_url):
    engine = open_current(db_url)
    try:
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT count(*) FROM scans")) == 0
    finally:
        engine.dispose()


def test_open_current_never_creates_a_sqlite_file_nor_its_folder(tmp_path):
    missing = tmp_path / "typo" / "meddaemon.db"
    with pytest.raises(DatabaseMissing, match=f"no meddaemon database at {missing}"):
        open_current(f"sqlite:///{missing}")
    assert not (tmp_path / "typo").exists()


def test_a_database_without_a_schema_is_missing_and_stays_empty(db_url):
    engine = create_db_engine(db_url)
    with engine.begin() as conn:  # the file (SQLite) or the database (PostgreSQL) exists, empty
        conn.execute(text("SELECT 1"))
    engine.dispose()
    with pytest.raises(DatabaseMissing, match="run `medcli db upgrade` or start the daemon"):
        open_current(db_url)
    engine = create_db_engine(db_url)
    assert set(inspect(engine).get_table_names()) == set()
    engine.dispose()


def test_a_database_holding_another_application_s_tables_is_refused_and_left_as_it_is(db_url):
    """A mistyped --db put meddaemon's tables among another application's, and said it "was empty"."""
    engine = create_db_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE customers (id INTEGER)"))
        conn.execute(text("INSERT INTO customers VALUES (1)"))
    where = re.escape(database_location(db_url))
    with pytest.raises(ForeignDatabase, match=f"the database at {where} holds tables of another application"):
        upgrade(engine)
    with pytest.raises(ForeignDatabase, match=r"\(customers\) and no meddaemon schema"):
        open_current(db_url)
    assert set(inspect(engine).get_table_names()) == {"customers"}
    engine.dispose()


@pytest.mark.parametrize("revision", ["0005", "0016"])
def test_another_application_numbering_its_revisions_as_meddaemon_does_is_still_another_application(db_url, revision):
    """Its `0005` read as "schema older than this meddaemon", and the upgrade advised ended in a
    traceback (no table scans); its `0016` as "database unavailable: no such table"."""
    engine = create_db_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE patients (id INTEGER)"))
        conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)"))
        conn.execute(text(f"INSERT INTO alembic_version VALUES ('{revision}')"))
    for check in (upgrade, require_current):
        with pytest.raises(ForeignDatabase, match=f"at Alembic revision {revision} and holds none of meddaemon's"):
            check(engine)
    assert set(inspect(engine).get_table_names()) == {"patients", "alembic_version"}
    engine.dispose()


def test_another_application_s_sqlite_file_is_not_switched_to_wal(tmp_path):
    """Write-ahead logging persists in the file: it was switched before the file was refused."""
    import sqlite3

    path = tmp_path / "theirs.db"
    with sqlite3.connect(path) as theirs:
        theirs.execute("CREATE TABLE patients (id INTEGER)")
    engine = create_db_engine(f"sqlite:///{path}")
    with pytest.raises(ForeignDatabase):
        upgrade(engine)
    engine.dispose()
    with sqlite3.connect(path) as theirs:
        assert theirs.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    ours = create_db_engine(f"sqlite:///{tmp_path / 'ours.db'}")
    upgrade(ours)
    with ours.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    ours.dispose()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_a_table_an_extension_owns_is_not_another_application_s(db_url):
    """PostGIS keeps ``spatial_ref_sys`` in the public schema: a database with the extension is empty
    of any application. (hstore stands in for PostGIS, which is not installed here: a table made a
    member of it is owned by the extension, as PostGIS's is.)"""
    engine = create_db_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE EXTENSION hstore"))
        conn.execute(text("CREATE TABLE spatial_ref_sys (srid INTEGER PRIMARY KEY)"))
        conn.execute(text("ALTER EXTENSION hstore ADD TABLE spatial_ref_sys"))
    assert upgrade(engine) is None
    assert current_revision(engine) == head_revision()
    engine.dispose()


def test_an_alembic_revision_of_another_application_is_its_database_not_a_newer_meddaemon(migrated_engine, db_url):
    """It was "upgrade meddaemon before using this database", exit 6 (a supervisor never restarts)."""
    with migrated_engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ae1027a6acf'"))
    for check in (upgrade, require_current):
        with pytest.raises(ForeignDatabase, match=f"at {re.escape(database_location(db_url))} is another application"):
            check(migrated_engine)


def test_an_older_schema_is_refused_and_left_as_it_is(db_url):
    engine = create_db_engine(db_url)
    upgrade(engine, "0004")
    with pytest.raises(SchemaTooOld, match="schema is older than this meddaemon"):
        require_current(engine)
    assert current_revision(engine) == "0004"
    upgrade(engine)
    require_current(engine)
    engine.dispose()


def test_a_newer_schema_is_refused_by_require_current(migrated_engine):
    with migrated_engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(SchemaTooNew, match="upgrade meddaemon"):
        require_current(migrated_engine)


def test_heatmaps_stored_as_files_before_0012_keep_them_and_later_ones_keep_their_grid_in_the_row(db_url):
    """0012: a map's grid goes into its row; rows written before keep their ``.npy`` path."""
    engine = create_db_engine(db_url)
    upgrade(engine, "0011")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tasks (name, description, created_at) VALUES ('busi', '', CURRENT_TIMESTAMP)"))
        conn.execute(
            text(
                "INSERT INTO model_versions (id, task_name, version, architecture, sha256, path, status, manifest, "
                "created_at) VALUES (1, 'busi', 'v1', 'small_cnn', :sha, 'models/busi/v1', 'active', '{}', "
                "CURRENT_TIMESTAMP)"
            ),
            {"sha": "cd" * 32},
        )
        conn.execute(
            text(
                "INSERT INTO scans (id, sha256, state, source_name, registered_at, updated_at) "
                "VALUES (1, :sha, 'inferred', 'synthetic.png', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            ),
            {"sha": "ab" * 32},
        )
        for result_id in (1, 2):
            conn.execute(
                text(
                    "INSERT INTO results (id, scan_id, model_version_id, label, probability, threshold, positive, "
                    "created_at) VALUES (:id, 1, 1, :label, 0.5, 0.5, :positive, CURRENT_TIMESTAMP)"
                ),
                {"id": result_id, "label": f"label{result_id}", "positive": result_id == 1},
            )
        conn.execute(
            text(
                "INSERT INTO heatmaps (result_id, method, array_path, overlay_path, height, width, created_at) "
                "VALUES (1, 'cam', 'heatmaps/ab/old.npy', 'heatmaps/ab/old.jpg', 224, 224, CURRENT_TIMESTAMP)"
            )
        )
    upgrade(engine)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO heatmaps (result_id, method, grid, overlay_path, height, width, created_at) "
                "VALUES (2, 'cam', :grid, 'heatmaps/ab/new.jpg', 224, 224, CURRENT_TIMESTAMP)"
            ),
            {"grid": b"\x93NUMPY grid"},
        )
        rows = conn.execute(text("SELECT array_path, grid FROM heatmaps ORDER BY result_id")).all()
    engine.dispose()
    assert [(path, grid if grid is None else bytes(grid)) for path, grid in rows] == [
        ("heatmaps/ab/old.npy", None),
        (None, b"\x93NUMPY grid"),
    ]


def test_upgrading_a_database_with_results_keeps_every_row_and_its_references(db_url):
    """SQLite: Alembic's batch mode copies a table and drops the original, and with foreign keys on
    that drop deleted every row referencing it ON DELETE CASCADE: from 0004 to head, every result,
    heatmap, report and scan event of a site's database was gone. The keys are on again after."""
    engine = create_db_engine(db_url)
    upgrade(engine, "0004")
    rows = {
        "tasks": "INSERT INTO tasks (name, description, created_at) VALUES ('busi', '', CURRENT_TIMESTAMP)",
        "model_versions": "INSERT INTO model_versions (id, task_name, version, architecture, sha256, path, status, "
        "manifest, created_at) VALUES (1, 'busi', 'v1', 'small_cnn', 'cd', 'models/busi/v1', 'active', '{}', "
        "CURRENT_TIMESTAMP)",
        "scans": "INSERT INTO scans (id, sha256, state, source_name, registered_at, updated_at) "
        "VALUES (1, 'ab', 'archived', 'synthetic.png', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
        "scan_events": "INSERT INTO scan_events (scan_id, state, at) VALUES (1, 'archived', CURRENT_TIMESTAMP)",
        "results": "INSERT INTO results (id, scan_id, model_version_id, label, probability, threshold, positive, "
        "created_at) VALUES (1, 1, 1, 'benign', 0.9, 0.5, true, CURRENT_TIMESTAMP)",
        "heatmaps": "INSERT INTO heatmaps (result_id, method, array_path, overlay_path, height, width, created_at) "
        "VALUES (1, 'cam', 'heatmaps/ab/1.npy', 'heatmaps/ab/1.jpg', 224, 224, CURRENT_TIMESTAMP)",
        "reports": "INSERT INTO reports (kind, scan_id, path, sha256, size_bytes, pages, with_phi, created_at) "
        "VALUES ('scan', 1, 'reports/ab.pdf', 'ef', 100, 1, false, CURRENT_TIMESTAMP)",
    }
    with engine.begin() as conn:
        for statement in rows.values():
            conn.execute(text(statement))
    upgrade(engine)
    with engine.connect() as conn:
        assert {table: conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() for table in rows} == dict.fromkeys(
            rows, 1
        )
    with pytest.raises(IntegrityError), engine.begin() as conn:  # the connection the upgrade used, from the pool
        conn.execute(text("INSERT INTO scan_events (scan_id, state, at) VALUES (42, 'routed', CURRENT_TIMESTAMP)"))
    engine.dispose()


def test_values_over_the_standard_s_lengths_are_kept_as_the_header_gave_them(migrated_engine):
    """0013: a 70-character UID or a 20-character CS value, which headers hold now and then: PostgreSQL
    refused the whole batch of scans holding one, and the daemon stopped at every start."""
    long_uid, long_code = "1.2." + "3" * 70, "POSTEROANTERIOR_VIEW"
    with migrated_engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO scans (sha256, state, source_name, registered_at, updated_at, study_instance_uid, "
                "sop_instance_uid, series_instance_uid, sop_class_uid, transfer_syntax_uid, modality, "
                "view_position, patient_sex, patient_age, patient_birth_date, patient_id, accession_number, "
                "body_part, photometric_interpretation) VALUES ('ab', 'routed', 'synthetic.dcm', "
                "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, :uid, :uid, :uid, :uid, :uid, :code, :code, :code, :code, "
                ":code, :uid, :uid, :uid, :uid)"
            ),
            {"uid": long_uid, "code": long_code},
        )
    with migrated_engine.connect() as conn:
        assert conn.execute(text("SELECT study_instance_uid, view_position FROM scans")).one() == (long_uid, long_code)


#: one daemon's start, as far as the schema goes: upgrade once ``go`` exists
UPGRADING = """
import sys, time
from pathlib import Path
from meddaemon.db.engine import create_db_engine
from meddaemon.db.migrate import upgrade
engine = create_db_engine(sys.argv[1])
while not Path(sys.argv[2]).exists():
    time.sleep(0.005)
print(upgrade(engine))
"""


def test_daemons_starting_together_on_a_new_database_upgrade_it_once_and_all_go_on(db_url, tmp_path):
    """Several hosts' daemons started at once (after a package upgrade) each upgraded the schema:
    on PostgreSQL all but one failed on the objects the first had just created (a traceback, exit 1)."""
    go = tmp_path / "go"
    daemons = [
        subprocess.Popen([sys.executable, "-c", UPGRADING, db_url, str(go)], stdout=PIPE, stderr=PIPE, text=True)
        for _ in range(3)
    ]
    time.sleep(3)  # each has imported meddaemon and waits
    go.touch()
    outputs = [daemon.communicate(timeout=120) for daemon in daemons]
    assert [daemon.returncode for daemon in daemons] == [0, 0, 0], [err for _, err in outputs]
    # each returns the revision it found under the lock, `medcli db upgrade`'s "was": one found none
    # (the command read it before the lock, and all three said "was empty")
    assert sorted(out.strip() for out, _ in outputs) == sorted(["None", head_revision(), head_revision()])
    engine = create_db_engine(db_url)
    require_current(engine)
    engine.dispose()


def test_failed_scans_of_a_0004_database_sharing_one_failed_name_upgrade_and_the_newest_keeps_it(db_url):
    """Before 0005 a failed file's name was chosen by looking at the disk only: once an operator
    cleared failed/, the next failure of that name took it again. 0005's unique index on the stored
    name then refused the upgrade, for good (the daemon could not start)."""
    engine = create_db_engine(db_url)
    upgrade(engine, "0004")
    with engine.begin() as conn:
        for scan_id, sha in ((1, "aa"), (2, "bb"), (3, "cc")):
            conn.execute(
                text(
                    "INSERT INTO scans (id, sha256, state, source_name, stored_path, failure_reason, registered_at, "
                    f"updated_at) VALUES ({scan_id}, '{sha}', 'failed', 'scan.png', "
                    f"'{'failed/scan.png' if scan_id < 3 else 'failed/other.png'}', 'corrupt_image', "
                    "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                )
            )
    upgrade(engine)
    require_current(engine)
    with engine.connect() as conn:
        stored = dict(conn.execute(text("SELECT id, stored_path FROM scans ORDER BY id")).all())
        events = conn.execute(text("SELECT scan_id, state, detail FROM scan_events")).all()
    assert stored == {1: None, 2: "failed/scan.png", 3: "failed/other.png"}
    assert [(scan_id, state) for scan_id, state, _ in events] == [(1, "failed")]
    assert "failed/scan.png" in events[0].detail and "scan 2" in events[0].detail
    engine.dispose()


def test_outbox_rows_of_a_0013_database_wait_from_their_creation_after_the_upgrade(db_url):
    """0014 adds ``pending_since`` (a retry restarts the wait); rows already there start from their
    creation, so a destination down for an hour still shows an hour's wait."""
    engine = create_db_engine(db_url)
    upgrade(engine, "0013")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO scans (id, sha256, state, source_name, registered_at, updated_at) "
                "VALUES (1, 'ab', 'reported', 'synthetic.dcm', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO outbox (scan_id, object_key, destination, path, status, attempts, created_at, "
                "next_attempt_at) VALUES (1, 'sr', 'pacs', 'dicom/sr.dcm', 'pending', 2, 1000.5, 2000.0)"
            )
        )
    upgrade(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT created_at, pending_since, attempts FROM outbox")).one() == (1000.5, 1000.5, 2)
    with engine.begin() as conn:  # a daemon of the version before, still running: its rows have no pending_since
        conn.execute(
            text(
                "INSERT INTO outbox (scan_id, object_key, destination, path, status, attempts, created_at, "
                "next_attempt_at) VALUES (1, 'pdf', 'pacs', 'dicom/pdf.dcm', 'pending', 0, 3000.0, 3000.0)"
            )
        )
    engine.dispose()


def test_an_older_sqlite_database_that_cannot_be_written_is_an_unwritable_database_not_a_traceback(tmp_path):
    """Upgraded by a user who may read it and not write it (or on a read-only mount): the error that
    dropped the connection was hidden by the switch of foreign keys back on, on that closed
    connection ("Cannot operate on a closed database"), and the CLI printed a traceback, exit 1."""
    from click.testing import CliRunner

    from meddaemon.cli.medcli import cli as medcli
    from permissions import immutable

    path = tmp_path / "meddaemon.db"
    older = create_db_engine(f"sqlite:///{path}")
    upgrade(older, "0010")
    older.dispose()
    with immutable(path):
        result = CliRunner().invoke(medcli, ["db", "upgrade", "--db", f"sqlite:///{path}"])
    assert result.exit_code == 3, result.output
    assert "attempt to write a readonly database" in result.output and "Traceback" not in result.output
    assert current_revision(create_db_engine(f"sqlite:///{path}")) == "0010"
