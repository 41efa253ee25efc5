"""Reading the CSV files of published datasets: required columns checked, rows as dictionaries."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from pathlib import Path

from meddaemon.files import read_text_in_place
from meddaemon.training.datasets.index import DatasetError

Row = dict[str, str]


def csv_delimiter(text: str) -> str:
    """What separates the columns: a comma, unless the header line has none and has semicolons (a
    spreadsheet saving CSV where the comma is the decimal mark: Excel in French, German...) or tabs."""
    header = text.split("\n", 1)[0]
    if "," in header or not (";" in header or "\t" in header):
        return ","
    return ";" if header.count(";") >= header.count("\t") else "\t"


def read_table(path: Path, required: Iterable[str], allowed: Iterable[str] | None = None) -> list[Row]:
    """Rows of ``path`` keyed by its header (columns separated as ``csv_delimiter`` finds). A
    missing required column is an error; so is any column outside ``allowed`` when it is given (a
    manifest has a fixed set of columns). Columns without a name (a trailing comma, as in NIH's
    ``Data_Entry_2017.csv``) are dropped."""
    try:
        text = read_text_in_place(path)
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=csv_delimiter(text))
        header = [name.strip() for name in reader.fieldnames or []]
        rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(path, f"cannot be read as CSV ({exc})", "a UTF-8 CSV file with a header row") from None
    required = list(required)
    missing = [c for c in required if c not in header]
    if missing:
        raise DatasetError(
            path, f"missing column(s) {', '.join(missing)} (header: {', '.join(header) or 'none'})",
            f"the columns {', '.join(required)}",
        )  # fmt: skip
    if allowed is not None:
        allowed = list(allowed)
        unknown = [c for c in header if c and c not in allowed]
        if unknown:
            raise DatasetError(
                path, f"unknown column(s) {', '.join(unknown)}", f"only the columns {', '.join(allowed)}"
            )
    return rows


def require_existing(table: Path, named: list[tuple[int, Path]]) -> None:
    """Every (row number, image path) named by ``table`` must exist."""
    missing = [(row, path) for row, path in named if not path.is_file()]
    if not missing:
        return
    shown = ", ".join(f"row {row}: {path}" for row, path in missing[:5])
    raise DatasetError(
        table,
        f"{len(missing)} row(s) name images that do not exist ({shown}{', ...' if len(missing) > 5 else ''})",
        "an image file for every row (a partial download needs its label file cut to the images present)",
    )
