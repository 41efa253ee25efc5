"""The label formats, and the errors a bad labels file gets: file, line, column and what was expected."""

import os
from pathlib import Path

import pytest

from audit_factory import stored_predictions
from meddaemon.audit.join import join
from meddaemon.audit.labels import (
    LabelFileError,
    check_columns_beside_the_truth,
    check_label_columns,
    read_label_folders,
    read_labels,
)
from meddaemon.engine.tasks import BUILTIN_TASKS

VOCABULARY = {label for t in BUILTIN_TASKS.values() for label in t.labels}


def write(tmp_path, text, name="labels.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_label_column_with_one_class_or_pipe_joined_findings(tmp_path):
    t = read_labels(write(tmp_path, "file,label,site\na.png,malignant,north\nb.png,Effusion|Mass,south\n"), VOCABULARY)
    assert t.format == "csv-label" and t.key_kind == "file"
    assert [r.positives for r in t.rows] == [{"malignant"}, {"Effusion", "Mass"}]
    assert t.rows[0].known is None
    assert t.attribute_columns == ("site",)
    assert t.rows[1].attributes == {"site": "south"} and t.rows[1].line == 3
    assert len(t.sha256) == 64


def test_a_label_written_in_another_case_is_read_as_the_task_spells_it(tmp_path):
    """A spreadsheet's "Benign" was refused as an unknown label, where an evaluation reads a class
    folder ``BENIGN/`` as benign."""
    text = "file,label\na.png,Benign\nb.png,EFFUSION|mass\nc.png,no finding\n"
    t = read_labels(write(tmp_path, text), VOCABULARY)
    assert [r.positives for r in t.rows] == [{"benign"}, {"Effusion", "Mass"}, set()]


def test_one_column_per_label_with_unknown_values_left_unknown(tmp_path):
    t = read_labels(write(tmp_path, "sop_instance_uid,Effusion,Mass,sex\n1.2.3,1,,F\n1.2.4,no,yes,M\n"), VOCABULARY)
    assert t.format == "csv-columns" and t.key_kind == "sop_instance_uid"
    assert t.label_columns == ("Effusion", "Mass")
    assert t.rows[0].positives == {"Effusion"} and t.rows[0].known == {"Effusion"}
    assert t.rows[1].positives == {"Mass"} and t.rows[1].known == {"Effusion", "Mass"}


def test_one_column_per_label_as_pandas_writes_it_with_gaps_reads_as_0_1(tmp_path):
    """A 0/1 column with an empty cell is a float column to pandas, written ``1.0``/``0.0``;
    refused as "not 0/1" before."""
    t = read_labels(write(tmp_path, "file,Effusion,Mass\na.png,1.0,\nb.png,0.0,1.0\n"), VOCABULARY)
    assert t.label_columns == ("Effusion", "Mass")
    assert [r.positives for r in t.rows] == [{"Effusion"}, {"Mass"}]
    assert [r.known for r in t.rows] == [{"Effusion"}, {"Effusion", "Mass"}]
    # as pandas writes it with sep=";" and decimal=",", for a decimal-comma locale: refused before
    with_commas = read_labels(write(tmp_path, "file;Effusion;Mass\na.png;1,0;\nb.png;0,0;1,0\n"), VOCABULARY)
    assert [r.positives for r in with_commas.rows] == [{"Effusion"}, {"Mass"}]
    with pytest.raises(LabelFileError, match="'0,5' is not 0/1"):
        read_labels(write(tmp_path, "file;Effusion\na.png;0,5\n"), VOCABULARY)
    for cell in ("0.5", "0.99999999999999999", "1e0", "01", "+1", "\u0661"):  # the last: an Arabic-Indic 1
        with pytest.raises(LabelFileError, match="is not 0/1"):
            read_labels(write(tmp_path, f"file,Effusion\na.png,{cell}\n"), VOCABULARY)


def test_nih_data_entry_as_published(tmp_path):
    text = (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n"
        "00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,\n"
        "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143,\n"
        "00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171,\n"
    )
    t = read_labels(write(tmp_path, text, "Data_Entry_2017.csv"), VOCABULARY)
    assert t.format == "nih" and t.task_hint == "chestxray14"
    assert [r.positives for r in t.rows] == [{"Cardiomegaly"}, {"Cardiomegaly", "Emphysema"}, set()]
    assert t.rows[0].attributes["patient_id"] == "1"
    assert t.rows[2].attributes["sex"] == "M" and t.rows[2].attributes["view"] == "PA"
    assert t.rows[2].attributes["age"] == "81"


@pytest.mark.parametrize(
    "text",
    [
        "file;label;site\r\na.png;malignant;north\r\nb.png;Effusion|Mass;south\r\n",  # Excel, French or German
        "file\tlabel\tsite\na.png\tmalignant\tnorth\nb.png\tEffusion|Mass\tsouth\n",
    ],
    ids=["semicolons", "tabs"],
)
def test_columns_separated_by_semicolons_or_tabs_read_as_the_comma_file(tmp_path, text):
    t = read_labels(write(tmp_path, text), VOCABULARY)
    assert t.format == "csv-label" and [r.key for r in t.rows] == ["a.png", "b.png"]
    assert [r.positives for r in t.rows] == [{"malignant"}, {"Effusion", "Mass"}]
    assert [r.attributes["site"] for r in t.rows] == ["north", "south"]


def test_columns_without_a_name_at_the_end_of_every_line_are_not_read(tmp_path):
    """A spreadsheet's export with ",," at each line's end: one such column was accepted, two were
    refused as a "duplicate column name" ''."""
    t = read_labels(write(tmp_path, "file,label,site,,\na.png,benign,north,,\nb.png,normal,south,,\n"), VOCABULARY)
    assert [r.key for r in t.rows] == ["a.png", "b.png"] and t.attribute_columns == ("site",)


def test_a_header_with_commas_is_a_comma_file_whatever_its_cells_hold(tmp_path):
    t = read_labels(write(tmp_path, "file,label,note\na.png,benign,left; upper\n"), VOCABULARY)
    assert t.rows[0].attributes["note"] == "left; upper"


def test_busi_folders_skip_masks(tmp_path):
    for cls, names in {"benign": ["benign (1).png", "benign (1)_mask.png"], "normal": ["normal (1).png",
                       "normal (1)_mask_1.png"], "malignant": []}.items():  # fmt: skip
        (tmp_path / cls).mkdir()
        for name in names:
            (tmp_path / cls / name).write_bytes(b"SYNTHETIC")
    t = read_label_folders(tmp_path, BUILTIN_TASKS["busi"].labels)
    assert [(r.key, set(r.positives)) for r in t.rows] == [
        ("benign/benign (1).png", {"benign"}),
        ("normal/normal (1).png", {"normal"}),
    ]


def test_busi_folders_key_a_name_that_is_not_utf8_as_the_daemon_stores_it(tmp_path):
    """The daemon renames ``sc\\xe9n.png`` in its inbox to ``sc%E9n.png`` (an evaluation stores that
    name): the folder's label is keyed so, and the listing's fingerprint takes the name's bytes."""
    for cls in ("benign", "malignant"):
        (tmp_path / cls).mkdir()
    Path(os.fsdecode(os.fsencode(tmp_path) + b"/benign/sc\xe9n (1).png")).write_bytes(b"SYNTHETIC")
    (tmp_path / "malignant" / "malignant (1).png").write_bytes(b"SYNTHETIC")
    t = read_label_folders(tmp_path, BUILTIN_TASKS["busi"].labels)
    assert [(r.key, set(r.positives)) for r in t.rows] == [
        ("benign/sc%E9n (1).png", {"benign"}),
        ("malignant/malignant (1).png", {"malignant"}),
    ]
    assert len(t.sha256) == 64


def test_folder_labels_reusing_a_name_across_classes_each_find_their_own_scan(tmp_path):
    """Keyed by the file's name alone, ``benign/1.png`` and ``malignant/1.png`` were one key with two
    labels, a conflict: the audit ran on 1 scan of 7, exit 0."""
    for cls in ("benign", "malignant"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "1.png").write_bytes(f"SYNTHETIC {cls}".encode())
    t = read_label_folders(tmp_path, BUILTIN_TASKS["busi_binary"].labels)
    cohort, report = join(stored_predictions("busi_binary", ["benign/1.png", "malignant/1.png"], read_in_place=True), t)
    assert report.conflicts == [] and report.matched == 2
    truth = sorted(zip(cohort.scan_ids.tolist(), cohort.y.ravel().tolist(), strict=True))
    assert truth == [(1, 0), (2, 1)]  # malignant or not, by the folder of each


def test_busi_folders_must_be_classes(tmp_path):
    (tmp_path / "maybe").mkdir()
    with pytest.raises(LabelFileError, match="sub-folders must be classes"):
        read_label_folders(tmp_path, BUILTIN_TASKS["busi"].labels)


@pytest.mark.parametrize(
    ("text", "line", "column", "expected"),
    [
        ("name,label\na.png,benign\n", 1, None, "no key column: expected one of file, sop_instance_uid, sha256"),
        ("file,colour\na.png,red\n", 1, None, "no label column: expected a 'label' column"),
        ("file,label\na.png,benign\nb.png,cancerous\n", 3, "label", "unknown label 'cancerous'; expected one of"),
        ("file,Effusion\na.png,1\nb.png,maybe\n", 3, "Effusion", "'maybe' is not 0/1"),
        # read as {Effusion}: the row's truth changed without a word
        ("file,label\na.png,No Finding|Effusion\n", 2, "label", "says 'No Finding' and Effusion; give one or"),
        ("file,label\n,benign\n", 2, "file", "empty file"),
        ("file,label\na.png,benign,extra\n", 2, None, "3 values but the header has 2 columns"),
        ("file,label,label\na.png,benign,normal\n", 1, "label", "duplicate column name"),
        ("", None, None, "the file is empty"),
        # a stray quote in a comment: every row after it was one cell, dropped from the truth, exit 0
        (
            'file,label,note\na.png,benign,\nb.png,malignant,"5 mm, irregular\nc.png,normal,\n',
            3,
            None,
            "a quote opened on this line is never closed",
        ),
        (
            'file,label,note\na.png,benign,"5 mm\nb.png,normal,see "prior" scan\nc.png,normal,\n',
            2,
            None,
            "not a readable CSV: ',' expected after '\"'",
        ),
    ],
)
def test_bad_files_are_refused_with_where_and_what(tmp_path, text, line, column, expected):
    path = write(tmp_path, text)
    with pytest.raises(LabelFileError) as info:
        read_labels(path, VOCABULARY)
    message = str(info.value)
    assert message.startswith(str(path))
    assert expected in message
    assert info.value.line == line and info.value.column == column


def test_a_quoted_note_over_several_lines_is_one_cell_of_its_row(tmp_path):
    """As pandas and Excel write a note with a line break: one row, however many commas its lines hold."""
    text = 'file,label,report\na.png,benign,"Oval mass.\nBI-RADS 3, 8 mm, circumscribed"\nb.png,normal,\n'
    t = read_labels(write(tmp_path, text), VOCABULARY)
    assert [(r.key, r.positives, r.line) for r in t.rows] == [("a.png", {"benign"}, 2), ("b.png", {"normal"}, 4)]
    assert t.rows[0].attributes == {"report": "Oval mass.\nBI-RADS 3, 8 mm, circumscribed"}


def test_a_binary_file_is_refused_as_not_utf8(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes(b"file,label\n\xff\xfe\x00")
    with pytest.raises(LabelFileError, match="not UTF-8"):
        read_labels(path, VOCABULARY)


NIH_WIDE_HEADER = "file,Atelectasis,Effusion,Pneumothoraxx,Patient ID,Patient Gender\n"


def test_a_0_1_column_named_like_a_label_but_not_one_is_refused_with_the_close_label(tmp_path):
    path = write(tmp_path, NIH_WIDE_HEADER + "a.png,0,1,0,1,M\nb.png,1,0,1,2,F\n")
    with pytest.raises(LabelFileError) as info:
        read_labels(path, VOCABULARY)
    assert info.value.line == 1 and info.value.column == "Pneumothoraxx"
    assert "holds 0/1 values but is not a label" in str(info.value)
    assert "did you mean 'Pneumothorax'?" in str(info.value)


def test_the_same_column_in_a_label_file_is_refused_too(tmp_path):
    path = write(tmp_path, "file,label,pneumothorax\na.png,Effusion,1\nb.png,No Finding,0\n")
    with pytest.raises(LabelFileError, match="did you mean 'Pneumothorax'") as info:
        read_labels(path, VOCABULARY)
    assert info.value.column == "pneumothorax"


@pytest.mark.parametrize(
    ("text", "truth_column", "line"),
    [
        ("file,label,Effusion\na.png,Effusion,1\nb.png,No Finding,1\n", "label", 3),
        ("Image Index,Finding Labels,Patient ID,Effusion\na.png,Mass,1,1\n", "Finding Labels", 2),
    ],
)
def test_a_0_1_column_of_a_task_label_that_contradicts_the_column_of_the_truth_is_refused(
    tmp_path, text, truth_column, line
):
    """It was read as an attribute, and as the row's labels say every other label is absent, its
    positives became negatives in the audit, without a word."""
    table = read_labels(write(tmp_path, text), VOCABULARY)
    with pytest.raises(LabelFileError, match=f"and the '{truth_column}' column says otherwise") as info:
        check_columns_beside_the_truth(table, BUILTIN_TASKS["chestxray14"].labels)
    assert (info.value.line, info.value.column) == (line, "Effusion")


def test_columns_that_agree_with_the_truth_or_name_another_task_s_label_stay_attributes(tmp_path):
    """NIH files with one-hot finding columns beside Finding Labels, and a 0/1 covid column in a
    chest X-ray audit, are good truth and a good attribute."""
    nih = "Image Index,Finding Labels,Patient ID,Mass,Effusion,covid\na.png,Mass,1,1,0,1\nb.png,No Finding,2,0,0,0\n"
    table = read_labels(write(tmp_path, nih), VOCABULARY)
    check_columns_beside_the_truth(table, BUILTIN_TASKS["chestxray14"].labels)
    assert table.attribute_columns[-3:] == ("Mass", "Effusion", "covid")


def test_a_0_1_column_unlike_any_label_stays_an_attribute(tmp_path):
    t = read_labels(write(tmp_path, "file,Effusion,icu,sex\na.png,1,0,F\nb.png,0,1,M\n"), VOCABULARY)
    assert t.label_columns == ("Effusion",) and t.attribute_columns == ("icu", "sex")


def test_an_encoding_error_names_its_line(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes("file,label,site\na.png,benign,north\nb.png,normal,Mal\xf6\n".encode("latin-1"))
    with pytest.raises(LabelFileError) as info:
        read_labels(path, VOCABULARY)
    assert info.value.line == 3
    assert str(info.value).startswith(f"{path}, line 3: not UTF-8 text")


def test_an_encoding_error_after_a_byte_order_mark_names_its_line(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes(b"\xef\xbb\xbffile,label\na.png,benign\n\n\xff.png,normal\n")
    with pytest.raises(LabelFileError) as info:
        read_labels(path, VOCABULARY)
    assert info.value.line == 4


def test_a_label_column_of_another_task_is_refused_once_the_task_is_known(tmp_path):
    t = read_labels(write(tmp_path, "file,Effusion,covid\na.png,1,0\n"), VOCABULARY)
    nih = BUILTIN_TASKS["chestxray14"]
    with pytest.raises(LabelFileError, match="a 0/1 label column, but not a label of task chestxray14") as info:
        check_label_columns(t, nih.name, nih.labels)
    assert info.value.line == 1 and info.value.column == "covid"
