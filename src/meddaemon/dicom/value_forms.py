"""A source's dates, times, ages and names in the forms PS3.5 gives them, for the objects that copy
them: vendors write forms the standard only asks readers to accept (ACR-NEMA's ``2024.01.05`` and
``12:30:00``), fractions of more than six digits, dates that never were, ages without their unit
and names of more than five components. highdicom refuses the first ones (the SR, the map and the
capture could not be built); dciodvfy refuses every one.

Each function returns the value in its standard form, or None where it means nothing (the caller
writes a type-2 attribute empty and leaves another out)."""

from __future__ import annotations

import datetime
import re

_DATE = re.compile(r"(\d{4})[.-]?(\d{2})[.-]?(\d{2})")
_TIME = re.compile(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(?:\.(\d*))?)?)?")
_DATETIME = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d*))?([+-]\d{4})?")
_AGE = re.compile(r"\d{3}[DWMY]")
#: the components of a person's name in each of its groups: family, given, middle, prefix, suffix
NAME_COMPONENTS = 5


def date(value: str) -> str | None:
    """``YYYYMMDD`` of a date written so or with dots (or dashes) between its parts."""
    found = _DATE.fullmatch(value.strip())
    if found is None or not _is_date(*found.groups()):
        return None
    return "".join(found.groups())


def time(value: str) -> str | None:
    """``HH[MM[SS[.F]]]`` of a time written so or with colons, its fraction cut to six digits (a dot
    without one dropped); a leap second (60, which Python's times and highdicom refuse) as the second
    before it."""
    found = _TIME.fullmatch(value.strip())
    if found is None:
        return None
    hours, minutes, seconds, fraction = found.groups()
    if int(hours) > 23 or int(minutes or 0) > 59 or int(seconds or 0) > 60:
        return None
    if seconds == "60":
        seconds = "59"
    written = hours + (minutes or "") + (seconds or "")
    return written + (f".{fraction[:6]}" if fraction else "")


def datetime_value(value: str) -> str | None:
    """``YYYY[MM[DD[HH[MM[SS[.F]]]]]][&ZZXX]``, its fraction cut to six digits."""
    found = _DATETIME.fullmatch(value.strip())
    if found is None:
        return None
    year, month, day, hours, minutes, seconds, fraction, offset = found.groups()
    if not _is_date(year, month or "01", day or "01"):
        return None
    if int(hours or 0) > 23 or int(minutes or 0) > 59 or int(seconds or 0) > 60:
        return None
    if seconds == "60":  # as ``time`` writes a leap second
        seconds = "59"
    written = "".join(part or "" for part in (year, month, day, hours, minutes, seconds))
    return written + (f".{fraction[:6]}" if fraction and seconds else "") + (offset or "")


def age(value: str) -> str | None:
    """An Age String (``045Y``) as it is; None for one without its unit or of another length."""
    return value if _AGE.fullmatch(value.strip()) else None


def person_name(group: str) -> str:
    """One component group of a person's name in at most five components: those past the fifth
    join the fifth (the suffix), a space between each."""
    components = group.split("^")
    if len(components) <= NAME_COMPONENTS:
        return group
    return "^".join([*components[: NAME_COMPONENTS - 1], " ".join(components[NAME_COMPONENTS - 1 :])])


def _is_date(year: str, month: str, day: str) -> bool:
    try:
        datetime.date(int(year), int(month), int(day))
    except ValueError:
        return False
    return True


#: the form function of each VR this module writes in its standard form
BY_VR = {"DA": date, "TM": time, "DT": datetime_value, "AS": age}
