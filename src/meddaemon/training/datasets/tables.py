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


class CsvFault(ValueError):
    """A CSV that does not read as its rows: what, and on which line."""

    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


def csv_records(text: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header of a CSV (its columns separated as ``csv_delimiter`` finds) and its other records,
    each with the line it starts on; ``CsvFault`` where a quote makes it unreadable. A stray quote
    (``"5 mm, irregular`` in a comment) made every line after it one cell, up to the next quote or
    the end of the file: read leniently, those rows were gone without a word (a labels file of 300
    rows audited on 40, a COVID table's images left out). Read strictly, a quote never closed, or
    closed before more of its cell, is an error; a quoted note running over lines stays one."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=csv_delimiter(text), strict=True)
    line = 1
    try:
        header = next(reader, [])
        records = []
        line = reader.line_num + 1
        for row in reader:
            if row:
                records.append((line, row))
            line = reader.line_num + 1
    except csv.Error as exc:
        if "unexpected end of data" in str(exc):
            raise CsvFault("a quote opened on this line is never closed (a stray '\"'?)", line) from None
        raise CsvFault(f"not a readable CSV: {exc}", line) from None
    return header, records


def read_table(path: Path, required: Iterable[str], allowed: Iterable[str] | None = None) -> list[Row]:
    """Rows of ``path`` keyed by its header (columns separated as ``csv_delimiter`` finds). A
    missing required column is an error; so is any column outside ``allowed`` when it is given (a
    manifest has a fixed set of columns). Columns without a name (a trailing comma, as in NIH's
    ``Data_Entry_2017.csv``) are dropped."""
    try:
        names, records = csv_records(read_text_in_place(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(path, f"cannot be read as CSV ({exc})", "a UTF-8 CSV file with a header row") from None
    except CsvFault as fault:
        raise DatasetError(path, f"line {fault.line}: {fault.message}", "a UTF-8 CSV file with a header row") from None
    header = [name.strip() for name in names]
    for line, row in records:
        if len(row) > len(header) and any(cell.strip() for cell in row[len(header) :]):
            raise DatasetError(
                path,
                f"line {line}: {len(row)} values but the header has {len(header)} columns "
                "(a value holding the separator, unquoted?)",
                "a UTF-8 CSV file with a header row; a value holding the separator in quotes",
            )
    rows = [
        {name: (row[i] if i < len(row) else "").strip() for i, name in enumerate(header) if name} for _, row in records
    ]
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
    windows = any("\\" in str(path) for _, path in missing)
    raise DatasetError(
        table,
        f"{len(missing)} row(s) name images that do not exist ({shown}{', ...' if len(missing) > 5 else ''})",
        "an image file for every row (a partial download needs its label file cut to the images present)"
        + ("; paths written with '/' between folders ('\\' is no separator here)" if windows else ""),
    )
