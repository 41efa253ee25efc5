"""File names the system gives that are not UTF-8 (a Latin-1 share, an old archive): a name a
database can store, and one a log line can show."""

from __future__ import annotations

import os
from pathlib import Path

from meddaemon.daemon.filing import overlay_path
from meddaemon.dicom.writer import object_path
from meddaemon.engine.tasks import BUILTIN_TASKS
from meddaemon.names import NAME_MAX, escape_controls, fitted, is_utf8, label_file_part, shown_name, utf8_name

LATIN1 = os.fsdecode(b"sc\xe9n \xfc\xff.png")


def test_a_name_that_is_not_utf8_is_known_as_such():
    assert not is_utf8(LATIN1) and not is_utf8(Path("busi") / LATIN1)
    assert is_utf8("ünïcødé 医学.png") and is_utf8("scén.png")


def test_each_byte_that_is_not_utf8_is_stored_as_percent_hex_and_a_valid_name_as_it_is():
    assert utf8_name(LATIN1) == "sc%E9n %FC%FF.png"
    assert utf8_name(Path("lot") / LATIN1) == "lot/sc%E9n %FC%FF.png"
    assert utf8_name("ünïcødé 医学 100%.png") == "ünïcødé 医学 100%.png"


def test_a_log_line_shows_such_a_byte_as_an_escape_and_a_valid_name_as_it_is():
    assert shown_name(LATIN1) == "sc\\xe9n \\xfc\\xff.png"
    assert shown_name("ünïcødé 医学.png") == "ünïcødé 医学.png"


def test_a_name_made_longer_than_received_is_cut_at_a_character_to_fit():
    assert fitted("scan", "__2.png") == "scan__2.png"
    name = fitted("é" * 200, "__retry7.png")  # two bytes a character: never cut inside one
    assert name.endswith("é__retry7.png") and len(name.encode()) in (NAME_MAX - 1, NAME_MAX)
    assert len(fitted("é" * 200, ".png", NAME_MAX - len(".reason.json")).encode()) <= NAME_MAX - 12


def test_control_characters_are_escaped_for_a_log_line_or_a_terminal_and_the_rest_left_alone():
    assert escape_controls("a\nb\tc\x1b[2J\x85d é 医") == "a\\nb\\tc\\x1b[2J\\x85d é 医"


def test_bidirectional_overrides_are_escaped_so_a_name_cannot_turn_what_follows_it_around():
    """Drawn by a browser, "rtl\u202egnp.exe.png" read "rtlgnp.exe.png" backwards, and the task and the
    hash after it on the console's scan page too. Letters of right-to-left scripts are left alone."""
    assert escape_controls("rtl\u202egnp.exe.png") == "rtl\\u202egnp.exe.png"
    assert escape_controls("a\u2066b\u2069c\u202ad") == "a\\u2066b\\u2069c\\u202ad"
    assert escape_controls("مرحبا שלום") == "مرحبا שלום"
    assert shown_name(os.fsdecode(b"new\nline \xe9.png")) == "new\\nline \\xe9.png"


def test_labels_that_fold_alike_keep_apart_in_file_names_and_simple_ones_keep_their_own():
    """A custom task's ``mass:calcified`` and ``mass_calcified`` shared their overlay and DICOM
    object files (one label's map sent twice, the other's never); ``benign/normal`` made a folder.
    Every built-in label, and any made of letters, digits, '_' and '-', names its files as before."""
    labels = ["mass:calcified", "mass_calcified", "mass calcified", "mass/calcified", "mass\\calcified"]
    parts = [label_file_part(label) for label in labels]
    assert len(set(parts)) == len(labels) and parts[1] == "mass_calcified"
    assert all("/" not in part and "\\" not in part for part in parts)
    assert all(label_file_part(label) == label for task in BUILTIN_TASKS.values() for label in task.labels)
    assert object_path(Path("/d"), "ab" * 32, "pmap:mass:calcified") != object_path(
        Path("/d"), "ab" * 32, "pmap:mass_calcified"
    )
    assert object_path(Path("/d"), "ab" * 32, "pmap:Effusion").name == "pmap_Effusion.dcm"
    assert object_path(Path("/d"), "ab" * 32, "sr").name == "sr.dcm"
    heatmaps = Path("/h")
    assert overlay_path(heatmaps, "ab" * 32, 1, "mass:calcified") != overlay_path(
        heatmaps, "ab" * 32, 1, "mass_calcified"
    )
