"""Untrusted strings into a PDF: control characters dropped, long values cut visibly, RTL reordered."""

import random
import string
import unicodedata

from meddaemon.report.text import ELLIPSIS, _printable_only, _strength, clean, markup, person_name, visual_order


def test_control_and_bidi_override_characters_are_dropped_and_whitespace_folded():
    assert clean("A\x00B\x1b[1mC\u202eD\tE\nF\u200bG") == "AB[1mCD E FG"


def test_long_values_are_cut_with_a_visible_ellipsis():
    cut = clean("N" * 500, limit=64)
    assert len(cut) == 64 and cut.endswith(ELLIPSIS) and cut.startswith("N" * 63)
    assert clean("short", limit=64) == "short"


def test_person_names_show_their_components():
    assert person_name("DOE^JANE^^DR") == "DOE JANE DR"
    assert person_name("Yamada^Tarou=山田^太郎") == "Yamada Tarou = 山田 太郎"
    assert person_name(None) == ""


def test_right_to_left_runs_are_put_in_visual_order():
    assert visual_order("abc") == "abc"
    assert visual_order("שלום") == "םולש"
    # a left-to-right line keeps its order; the Hebrew word inside is reversed in place
    assert visual_order("DOE שלום 12") == "DOE םולש 12"
    # a right-to-left line lays its runs out from the right; digits keep their own order
    assert visual_order("שלום 12") == "12 םולש"


def test_brackets_laid_out_right_to_left_are_mirrored_as_the_bidi_algorithm_does():
    """Reversed without their mirror, "(רחל)" was drawn ")רחל(" in a patient's name."""
    assert visual_order("כהן^שרה (רחל)") == "(לחר) הרש^ןהכ"
    assert visual_order("יצרן [דגם] ‹ב>") == "<ב› [םגד] ןרצי"
    assert visual_order("DOE (12)") == "DOE (12)"  # left to right: as written


def test_markup_escapes_what_a_paragraph_would_parse():
    assert markup("<b>&x</b>") == "&lt;b&gt;&amp;x&lt;/b&gt;"


def test_printable_ascii_is_cleaned_as_the_character_by_character_pass_cleans_it():
    """``clean`` skips the per-character pass for printable ASCII; the two must agree."""
    alphabet = string.printable[:95] + "     "  # printable ASCII, spaces more often
    rng = random.Random(14)
    for _ in range(500):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 120)))
        assert value.isascii() and value.isprintable()
        character_by_character = " ".join(_printable_only(unicodedata.normalize("NFC", value)).split())
        limit = rng.choice([8, 80, 200])
        expected = character_by_character
        if len(expected) > limit:
            expected = expected[: limit - 1].rstrip() + ELLIPSIS
        assert clean(value, limit) == expected


def test_no_ascii_character_is_right_to_left():
    """``visual_order`` returns ASCII text as it is without classifying its characters."""
    assert all(_strength(chr(code)) != "R" for code in range(128))
    every_ascii = "".join(map(chr, range(128)))
    assert visual_order(every_ascii) == every_ascii
