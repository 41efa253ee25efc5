"""Reading the truth: a simple labels CSV, NIH ChestX-ray14's ``Data_Entry_2017.csv``, or BUSI folders.

Every format becomes a :class:`LabelTable`: one row per labelled file (with the line it came from),
the labels that are positive, the labels whose value is known, and the other columns passed
through untouched as attributes (for subgroups); a 0/1 attribute named as a label of the audited
task must agree with the ``label``/``Finding Labels`` column (``check_columns_beside_the_truth``).
A problem in a file raises :class:`LabelFileError` naming the file, the line and column, and what
was expected there.

Simple CSV: a key column (``file``, ``sop_instance_uid`` or ``sha256``), then either a ``label``
column (one class, or labels joined by ``|``; empty or ``No Finding`` means none) or one column per
label with 0/1 (also true/false, yes/no, positive/negative; empty means not known).
"""

from __future__ import annotations

import codecs
import difflib
import functools
import hashlib
import itertools
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from meddaemon.names import utf8_name
from meddaemon.training.datasets.folders import BUSI_CLASSES, BUSI_MASK
from meddaemon.training.datasets.tables import CsvFault, csv_records
from meddaemon.training.images import is_image_file

KEY_COLUMNS = ("file", "sop_instance_uid", "sha256")
NO_FINDING = "No Finding"
TRUE_VALUES = frozenset({"1", "true", "yes", "positive", "pos", "y", "t"})
FALSE_VALUES = frozenset({"0", "false", "no", "negative", "neg", "n", "f"})
#: NIH columns renamed to the attribute names subgroups use.
NIH_ATTRIBUTES = {"Patient ID": "patient_id", "Patient Age": "age", "Patient Gender": "sex", "View Position": "view"}


class LabelFileError(ValueError):
    """A labels file that cannot be read as the truth; the message says where and what was expected."""

    def __init__(self, path: Path | str, message: str, line: int | None = None, column: str | None = None) -> None:
        where = str(path) + (f", line {line}" if line is not None else "")
        where += f", column {column!r}" if column is not None else ""
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line
        self.column = column


@dataclass(frozen=True)
class LabelRow:
    key: str
    line: int
    positives: frozenset[str]
    #: Labels whose value this row states; ``None``: every label of the task (absent ones are negative).
    known: frozenset[str] | None
    attributes: Mapping[str, str] = field(default_factory=dict)
    #: the SHA-256 of the labelled file, where the truth is a file here (``--labels-from-folders``):
    #: a scan of those bytes first seen under another name is found by it
    sha256: str | None = None
    #: where the truth is an image's folder, not a line of a file: the image, as its dataset names it
    #: (``line`` is then only its place in the listing)
    source: str | None = None


@dataclass(frozen=True)
class LabelTable:
    path: str
    sha256: str
    format: str  # "csv-label", "csv-columns", "nih", "folders"
    key_kind: str  # one of KEY_COLUMNS
    rows: list[LabelRow]
    label_columns: tuple[str, ...]
    attribute_columns: tuple[str, ...]
    task_hint: str | None = None
    #: what was read past, for the audit's notes
    notes: tuple[str, ...] = ()

    def labels_mentioned(self) -> set[str]:
        seen: set[str] = set(self.label_columns)
        for row in self.rows:
            seen |= row.positives
        return seen


def read_labels(path: Path, vocabulary: Iterable[str], expected: Iterable[str] | None = None) -> LabelTable:
    """Read a labels CSV (simple or NIH); ``vocabulary``: every label name of every task; ``expected``:
    the labels an unknown one is named against (the audited task's; it listed every task's 23)."""
    words = frozenset(vocabulary)
    shown = frozenset(expected) if expected is not None else words
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LabelFileError(path, f"cannot be read: {exc.strerror}") from None
    text = _decode(path, raw)
    try:
        names, rows = csv_records(text)
    except CsvFault as fault:
        raise LabelFileError(path, fault.message, fault.line) from None
    if not names:
        raise LabelFileError(path, "the file is empty; expected a header line")
    header = [h.strip() for h in names]
    records = [(line, row) for line, row in rows if any(cell.strip() for cell in row)]
    sha = hashlib.sha256(raw).hexdigest()
    if "Image Index" in header and "Finding Labels" in header:
        _refuse_misspelt_labels(path, header, records, words, ("Image Index", "Finding Labels"))
        return _nih(path, sha, header, records, words, shown)
    _refuse_misspelt_labels(path, header, records, words, (*KEY_COLUMNS, "label", "task"))
    return _simple(path, sha, header, records, words, shown)


def _decode(path: Path, raw: bytes) -> str:
    """The file as text (UTF-8, with or without a byte order mark); an error names the line."""
    body = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = body.rfind(b"\n", 0, exc.start) + 1
        raise LabelFileError(
            path,
            f"not UTF-8 text ({exc.reason}: byte 0x{body[exc.start]:02x}, byte {exc.start - line_start + 1} of "
            "the line); save the file as UTF-8",
            body.count(b"\n", 0, exc.start) + 1,
        ) from None


def normal_name(name: str) -> str:
    """A column or label name compared without case, spaces, underscores or hyphens mattering."""
    return re.sub(r"[\s_-]+", "_", name.strip().lower())


#: the columns that identify a patient, in any spelling (the NIH file's "Patient ID" follows from "patient_id")
IDENTIFYING = ("patient_id", "PatientID", "mrn")


def spellings(name: str) -> set[str]:
    """``name`` and its NIH file/audit counterpart (``Patient Gender``, ``sex``), normalised."""
    counterparts = {NIH_ATTRIBUTES.get(name), *(k for k, v in NIH_ATTRIBUTES.items() if v == name)}
    return {normal_name(n) for n in (name, *counterparts) if n}


#: with ``IDENTIFYING``, the columns whose values are patient data a level of ``--by`` would print and
#: store (DICOM's keywords and the usual spellings of names, birth dates, accession numbers, addresses,
#: telephones), compared with every character but letters and digits left out (``compact``)
PERSONAL = (
    *IDENTIFYING,
    "OtherPatientIDs",
    "other_ids",
    "patient_name",
    "Patient's Name",
    "name",
    "full_name",
    "first_name",
    "given_name",
    "last_name",
    "family_name",
    "surname",
    "patient_birth_date",
    "Patient's Birth Date",
    "birth_date",
    "date_of_birth",
    "dob",
    "accession_number",
    "accession_no",
    "accession",
    "patient_address",
    "Patient's Address",
    "address",
    "PatientTelephoneNumbers",
    "telephone",
    "telephone_number",
    "phone",
    "phone_number",
    "phone_numbers",
    "telephone_numbers",
    "medical_record_number",
    "medical_record_no",
    "birthday",
)


def compact(name: str) -> str:
    """``name`` in lower case with every character but letters and digits left out: ``Patient's
    Address``, ``PatientAddress`` and ``patient_address`` are one."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


_PERSONAL_KEYS = frozenset(compact(n) for n in PERSONAL)


def identifies_patients(name: str) -> bool:
    """A column naming each row's patient: what the intervals cluster on."""
    return bool(spellings(name) & {normal_name(n) for n in IDENTIFYING})


def is_personal(name: str) -> bool:
    """A column of patient data (an identifier, a name, a birth date...): never a subgroup. Its
    spellings in ``PERSONAL``, and any header whose words say so (``_says_personal``)."""
    key = compact(name)
    return (
        identifies_patients(name)
        or any(key.removeprefix(p) in _PERSONAL_KEYS for p in ("", "patient", "patients"))
        or _says_personal(name)
    )


#: a word that makes a column patient data wherever it stands in its header
_PERSONAL_WORDS = frozenset(
    {"mrn", "dob", "ssn", "birthdate", "birthday", "accession", "email", "surname", "forename", "firstname",
     "lastname", "fullname", "givenname", "familyname"}
)  # fmt: skip
#: whose identifier or number a column holds when the identifier's word follows it (``Patient ID``,
#: ``Subject No``, ``Medical Record Number``; not ``Number of Patients``, ``Medical Center ID``)
_WHOSE = frozenset({"patient", "patients", "subject", "subjects", "record"})
_IDENTIFIER_WORDS = frozenset({"id", "ids", "identifier", "identifiers", "number", "no", "nr", "num"})
#: the words a header of names, addresses or telephones is made of besides the thing itself
_WHOSE_OR_KIND = frozenset({"patient", "patients", "s", "home", "work", "mobile", "cell", "contact"})
_NAME_WORDS = _WHOSE_OR_KIND | {"full", "first", "last", "given", "family", "middle", "maiden"}
_ADDRESS_WORDS = _WHOSE_OR_KIND | {"street", "postal", "mailing"}
_PHONE_WORDS = _WHOSE_OR_KIND | {"number", "numbers", "no", "nr"}


def _says_personal(name: str) -> bool:
    """Whether a header's words name patient data in a spelling ``PERSONAL`` lacks (``Patient
    Identifier``, ``MRN Number``, ``Birthdate (YYYY-MM-DD)``, ``Tel`` printed an audit's levels, each
    a patient's, for every viewer of the console), and not a column patients share (``Medical
    Center ID``, ``Country of Birth``, ``Phone Model``, ``Smoker (yes/no)``)."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name).lower()
    order = [w for w in re.split(r"[^a-z0-9]+", spaced) if w]
    words = set(order)
    return bool(
        words & _PERSONAL_WORDS
        or "email" in re.sub(r"[^a-z]", "", spaced)
        or any(a in _WHOSE and b in _IDENTIFIER_WORDS for a, b in itertools.pairwise(order))
        or ("birth" in words and words & {"date", "day"})
        or ("name" in words and words - {"name", "names"} <= _NAME_WORDS)
        or ("address" in words and words - {"address", "addresses"} <= _ADDRESS_WORDS)
        or (words & {"phone", "telephone", "tel"} and words - {"phone", "telephone", "tel"} <= _PHONE_WORDS)
    )


def patient_column(columns: Iterable[str]) -> str | None:
    """Of a labels file's columns, the one that names each row's patient (``patient_id``,
    ``Patient ID``, ``MRN``...): the first, in the file's order."""
    return next((c for c in columns if identifies_patients(c)), None)


def closest_name(name: str, names: Iterable[str]) -> str | None:
    """The one of ``names`` that ``name`` most likely means (a typo, another case or spacing), if one is close."""
    by_normal = {normal_name(n): n for n in names}
    found = difflib.get_close_matches(normal_name(name), list(by_normal), n=1, cutoff=0.8)
    return by_normal[found[0]] if found else None


def _refuse_misspelt_labels(
    path: Path, header: list[str], records: list[tuple[int, list[str]]], words: frozenset[str], reserved: Iterable[str]
) -> None:
    """A 0/1 column whose name is close to a label but is not one (``Pneumothoraxx``) would be taken
    for an attribute and the label it meant left unknown: refuse it, naming the label it is close to."""
    skip = set(reserved) | words
    for index, name in enumerate(header):
        if not name or name in skip:
            continue
        meant = closest_name(name, words)
        if meant is not None and _holds_0_1(records, index):
            raise LabelFileError(
                path, f"holds 0/1 values but is not a label of any task; did you mean {meant!r}?", 1, name
            )


def _holds_0_1(records: list[tuple[int, list[str]]], index: int) -> bool:
    values = [_read_0_1(row[index]) for _, row in records if index < len(row) and row[index].strip()]
    return bool(values) and None not in values


def _read_0_1(value: str) -> bool | None:
    """True or False for a 0/1 cell, None for anything else. ``1.0`` and ``0.0`` count: pandas
    writes a 0/1 column with empty (unknown) cells as floats. Nothing else numeric does
    (``0.99999999999999999`` is 1 to ``float``)."""
    word = value.strip().lower()
    if word in TRUE_VALUES or word in FALSE_VALUES:
        return word in TRUE_VALUES
    written = _ZERO_OR_ONE.fullmatch(word)
    return None if written is None else written[1] == "1"


#: ``1``, ``1.0`` (pandas' float column), ``1,0`` (the same with ``decimal=","``, in a semicolon file)
_ZERO_OR_ONE = re.compile(r"([01])(?:[.,]0*)?", re.ASCII)


def check_label_columns(table: LabelTable, task: str, task_labels: Iterable[str]) -> None:
    """Every 0/1 label column of ``table`` is a label of the audited task."""
    labels = tuple(task_labels)
    for column in table.label_columns:
        if column not in labels:
            meant = closest_name(column, labels)
            raise LabelFileError(
                table.path,
                f"a 0/1 label column, but not a label of task {task} ({', '.join(labels)})"
                + (f"; did you mean {meant!r}?" if meant else ""),
                1,
                column,
            )


def check_columns_beside_the_truth(table: LabelTable, task_labels: Iterable[str]) -> None:
    """A 0/1 column named as a label of the audited task, in a file whose truth is one column
    (``label``, NIH's ``Finding Labels``), is read as an attribute: it must agree with that truth.
    One that did not was left out without a word, and as the truth column says every other label
    is absent, its positives were negatives in the audit."""
    if table.format not in ("csv-label", "nih"):
        return
    truth_column = "label" if table.format == "csv-label" else "Finding Labels"
    for column in (c for c in table.attribute_columns if c in set(task_labels)):
        for row in table.rows:
            said = _read_0_1(row.attributes.get(column, ""))
            if said is not None and said != (column in row.positives):
                raise LabelFileError(
                    Path(table.path),
                    f"says {column} is {'present' if said else 'absent'}, and the {truth_column!r} column "
                    "says otherwise; give the truth in one of them",
                    row.line,
                    column,
                )


def _cells(path: Path, header: list[str], line: int, row: list[str]) -> dict[str, str]:
    if len(row) > len(header) and any(c.strip() for c in row[len(header) :]):
        raise LabelFileError(path, f"{len(row)} values but the header has {len(header)} columns", line)
    return {h: (row[i].strip() if i < len(row) else "") for i, h in enumerate(header) if h}


def _split_labels(
    path: Path, value: str, words: frozenset[str], line: int, column: str, shown: frozenset[str]
) -> frozenset[str]:
    """The labels of a label cell (``|`` between several), each in the task's spelling when written in
    another case (``Benign``, ``EFFUSION``: a spreadsheet's capitals were refused as unknown labels, where
    an evaluation reads class folders in any case); a case two labels share is left as written."""
    spelt = _spellings(words)
    said = {spelt.get(v.strip().lower(), v.strip()) for v in value.split("|") if v.strip()}
    names = said - {NO_FINDING}
    if NO_FINDING in said and names:  # read as the findings alone, the row's truth was changed without a word
        raise LabelFileError(
            path, f"says {NO_FINDING!r} and {', '.join(sorted(names))}; give one or the other", line, column
        )
    unknown = sorted(names - words)
    if unknown:
        meant = closest_name(unknown[0], shown)
        hint = f"did you mean {meant!r}? " if meant else ""
        raise LabelFileError(
            path, f"unknown label {unknown[0]!r}; {hint}expected one of: {', '.join(sorted(shown))}", line, column
        )
    return frozenset(names)


@functools.cache
def _spellings(words: frozenset[str]) -> dict[str, str]:
    """Each label (and "No Finding") by its lower case, where no other label has that case."""
    by_case: dict[str, list[str]] = {}
    for word in (*words, NO_FINDING):
        by_case.setdefault(word.lower(), []).append(word)
    return {case: same[0] for case, same in by_case.items() if len(same) == 1}


def _simple(
    path: Path,
    sha: str,
    header: list[str],
    records: list[tuple[int, list[str]]],
    words: frozenset[str],
    shown: frozenset[str],
) -> LabelTable:
    named = [h for h in header if h]  # columns without a name (a spreadsheet's trailing ",,") are not read
    if len(set(named)) != len(named):
        dup = next(h for h in named if named.count(h) > 1)
        raise LabelFileError(path, "duplicate column name", 1, dup)
    key = next((k for k in KEY_COLUMNS if k in header), None)
    if key is None:
        raise LabelFileError(
            path, f"no key column: expected one of {', '.join(KEY_COLUMNS)}; found {', '.join(header)}", 1
        )
    if "label" in header:
        label_columns: tuple[str, ...] = ()
        fmt = "csv-label"
    else:
        label_columns = tuple(h for h in header if h in words)
        fmt = "csv-columns"
        if not label_columns:
            raise LabelFileError(
                path,
                "no label column: expected a 'label' column or one 0/1 column per label "
                f"({', '.join(sorted(words))}); found {', '.join(header)}",
                1,
            )
    reserved = {key, "label", "task", *label_columns}
    attribute_columns = tuple(h for h in header if h and h not in reserved)
    tasks: set[str] = set()
    rows = []
    for line, raw in records:
        cells = _cells(path, header, line, raw)
        if not cells[key]:
            raise LabelFileError(path, f"empty {key}", line, key)
        if cells.get("task"):
            tasks.add(cells["task"])
        if fmt == "csv-label":
            if not cells["label"]:
                raise LabelFileError(path, "empty label (write 'No Finding' for none)", line, "label")
            positives = _split_labels(path, cells["label"], words, line, "label", shown)
            known: frozenset[str] | None = None
        else:
            pos: set[str] = set()
            stated: set[str] = set()
            for col in label_columns:
                if not cells[col]:
                    continue
                value = _read_0_1(cells[col])
                if value is None:
                    raise LabelFileError(path, f"{cells[col]!r} is not 0/1 (or empty for unknown)", line, col)
                if value:
                    pos.add(col)
                stated.add(col)
            positives, known = frozenset(pos), frozenset(stated)
        rows.append(LabelRow(cells[key], line, positives, known, {a: cells[a] for a in attribute_columns}))
    if len(tasks) > 1:
        raise LabelFileError(path, f"one task per audit; the file names {sorted(tasks)}", column="task")
    return LabelTable(
        str(path), sha, fmt, key, rows, label_columns, attribute_columns, task_hint=next(iter(tasks), None)
    )


def _nih(
    path: Path,
    sha: str,
    header: list[str],
    records: list[tuple[int, list[str]]],
    words: frozenset[str],
    shown: frozenset[str],
) -> LabelTable:
    passed = tuple(NIH_ATTRIBUTES.get(h, h) for h in header if h and h not in ("Image Index", "Finding Labels"))
    rows = []
    for line, raw in records:
        cells = _cells(path, header, line, raw)
        if not cells["Image Index"]:
            raise LabelFileError(path, "empty Image Index", line, "Image Index")
        positives = _split_labels(path, cells["Finding Labels"], words, line, "Finding Labels", shown)
        attrs = {NIH_ATTRIBUTES.get(h, h): v for h, v in cells.items() if h not in ("Image Index", "Finding Labels")}
        rows.append(LabelRow(cells["Image Index"], line, positives, None, attrs))
    return LabelTable(str(path), sha, "nih", "file", rows, (), passed, task_hint="chestxray14")


def read_label_folders(root: Path, classes: Iterable[str]) -> LabelTable:
    """BUSI's layout: ``root/<class>/<image>``; the ground-truth masks (``_mask.png``, ``_mask_1.png``) are
    not scans. An image and a mask are what ``medcli retrain`` reads the same layout by."""
    if not root.is_dir():
        raise LabelFileError(root, "not a folder; expected one sub-folder per class")
    try:
        return _read_label_folders(root, set(classes))
    except (FileNotFoundError, NotADirectoryError):
        raise
    except OSError as exc:  # read past, a folder's images would be missing from the truth without a word
        raise LabelFileError(exc.filename or root, f"cannot be read ({exc.strerror or exc})") from None


def _read_label_folders(root: Path, wanted: set[str]) -> LabelTable:
    """As ``medcli retrain`` reads the folders: a class named in any case, and a BUSI class the task
    does not have (``normal/`` for ``busi_binary``) left out with a note (the published layout was refused)."""
    rows: list[LabelRow] = []
    listing = hashlib.sha256()
    by_name = {label.lower(): label for label in wanted}
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    left_out = [f for f in folders if f.name.lower() in BUSI_CLASSES and f.name.lower() not in by_name]
    folders = [f for f in folders if f not in left_out]
    unknown = [f.name for f in folders if f.name.lower() not in by_name]
    if unknown or not folders:
        raise LabelFileError(
            root, f"sub-folders must be classes ({', '.join(sorted(wanted))}); found {[f.name for f in folders]}"
        )
    for folder in folders:
        label = by_name[folder.name.lower()]
        for image in sorted(folder.iterdir()):
            if BUSI_MASK.match(image.name) or not is_image_file(image):
                continue
            listing.update(os.fsencode(f"{folder.name}/{image.name}\n"))
            # keyed as the daemon and an evaluation store a name that is not UTF-8
            sha = hashlib.sha256(image.read_bytes()).hexdigest()
            # keyed with its class folder: keyed by its name alone, a name both classes reuse was
            # one key with two labels, a conflict, and the audit ran on a fraction of the cohort
            key = utf8_name(f"{folder.name}/{image.name}")
            rows.append(LabelRow(key, len(rows) + 1, frozenset({label}), None, {}, sha, source=key))
    if not rows:
        raise LabelFileError(root, "no images in the class folders")
    notes = tuple(f"{f.name}/: not a class of the task, left out" for f in left_out)
    return LabelTable(str(root), listing.hexdigest(), "folders", "file", rows, (), (), task_hint=None, notes=notes)
