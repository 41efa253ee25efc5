"""File names the system gives that are not UTF-8 (a Latin-1 share, an old archive): a name a
database can store, and one a log line can show."""

from __future__ import annotations

import os
from pathlib import Path

from meddaemon.names import NAME_MAX, escape_controls, fitted, is_utf8, shown_name, utf8_name

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
    assert shown_name(os.fsdecode(b"new\nline \xe9.png")) == "new\\nline \\xe9.png"
