"""A source's dates, times, ages and names in the forms PS3.5 gives them (SYNTHETIC values)."""

from __future__ import annotations

import pytest

from meddaemon.dicom import value_forms


@pytest.mark.parametrize(
    ("written", "standard"),
    [("20240105", "20240105"), ("2024.01.05", "20240105"), (" 2024-01-05 ", "20240105"), ("20240229", "20240229")]
    + [(bad, None) for bad in ("20230229", "19801301", "2024", "05.01.2024", "yesterday")],
)
def test_a_date_is_written_yyyymmdd_or_means_nothing(written: str, standard: str | None) -> None:
    assert value_forms.date(written) == standard


@pytest.mark.parametrize(
    ("written", "standard"),
    [
        ("123000", "123000"),
        ("12:30:00", "123000"),
        ("12:30", "1230"),
        ("07", "07"),
        ("123000.5", "123000.5"),
        ("12:30:00.123456789", "123000.123456"),
        ("235960", "235959"),
        ("093000.", "093000"),
    ]
    + [(bad, None) for bad in ("240000", "126100", "123061", "1230001", "noon", "12.30")],
)
def test_a_time_is_written_hhmmss_with_six_fraction_digits_at_most_or_means_nothing(
    written: str, standard: str | None
) -> None:
    assert value_forms.time(written) == standard


@pytest.mark.parametrize(
    ("written", "standard"),
    [
        ("20240105123000", "20240105123000"),
        ("20240105123000.123456789+0100", "20240105123000.123456+0100"),
        ("2024", "2024"),
        ("202401", "202401"),
        ("20240105093000.", "20240105093000"),
        ("20161231235960", "20161231235959"),
    ]
    + [(bad, None) for bad in ("20241305", "20240105250000", "2024-01-05T12:30")],
)
def test_a_date_time_keeps_its_precision_and_offset_or_means_nothing(written: str, standard: str | None) -> None:
    assert value_forms.datetime_value(written) == standard


@pytest.mark.parametrize(("written", "standard"), [("045Y", "045Y"), ("003M", "003M"), ("45", None), ("45Y", None)])
def test_an_age_keeps_its_unit_or_means_nothing(written: str, standard: str | None) -> None:
    assert value_forms.age(written) == standard


@pytest.mark.parametrize(
    ("group", "standard"),
    [("Doe^Jane", "Doe^Jane"), ("A^B^C^D^E", "A^B^C^D^E"), ("A^B^C^D^E^F^G", "A^B^C^D^E F G")],
)
def test_a_name_group_has_five_components_at_most_the_rest_joining_the_suffix(group: str, standard: str) -> None:
    assert value_forms.person_name(group) == standard
