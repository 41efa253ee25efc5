"""Predictions joined to labels: what matched, what did not, conflicts, and the truth per task kind."""

import numpy as np
import pytest

from audit_factory import label_table as table
from audit_factory import stored_predictions as predictions
from meddaemon.audit.join import join
from meddaemon.audit.labels import LabelFileError
from meddaemon.audit.predictions import AuditInputError
from meddaemon.engine.tasks import BUILTIN_TASKS


def test_the_join_report_counts_every_kind_of_mismatch():
    preds = predictions("busi", ["busi/a.png", "busi/b.png", "busi/c.png", "x/d.png", "y/d.png", "busi/e.png"])
    t = table([
        ("a.png", {"benign"}, None, {}),
        ("a.png", {"benign"}, None, {}),  # identical duplicate: counted once
        ("b.png", {"normal"}, None, {}),
        ("b.png", {"malignant"}, None, {}),  # conflict: b is left out
        ("busi/c.png", {"normal"}, None, {}),
        ("d.png", {"normal"}, None, {}),  # two scans named d.png: ambiguous
        ("zzz.png", {"normal"}, None, {}),  # no prediction
    ])  # fmt: skip
    cohort, report = join(preds, t)
    assert report.matched == 2 and cohort.n == 2
    assert report.identical_duplicates == 1
    assert [c.key for c in report.conflicts] == ["b.png"] and report.conflicts[0].lines == (4, 5)
    assert report.ambiguous == ["d.png"]
    assert report.labels_without_prediction == ["zzz.png"]
    assert report.predictions_without_label == 3  # b.png has labels: it is counted among the conflicts alone
    assert set(report.predictions_without_label_examples) == {"x/d.png", "y/d.png", "busi/e.png"}
    assert cohort.truth_class.tolist() == [0, 2]  # benign, normal


def test_two_keys_for_the_same_scan_with_different_labels_conflict():
    preds = predictions("busi", ["busi/a.png", "busi/b.png"])
    t = table([("a.png", {"benign"}, None, {}), ("busi/a.png", {"normal"}, None, {}), ("b.png", {"normal"}, None, {})])
    cohort, report = join(preds, t)
    assert cohort.n == 1 and len(report.conflicts) == 1
    assert "same scan" in report.conflicts[0].detail


def accounted_rows(report) -> int:  # type: ignore[no-untyped-def]
    """Every label row is matched, an identical duplicate, in a conflict, or a key left unmatched."""
    return (
        report.matched + report.identical_duplicates + sum(len(c.lines) for c in report.conflicts)
        + len(report.labels_without_prediction) + len(report.ambiguous)
    )  # fmt: skip


@pytest.mark.parametrize(
    "rows",
    [
        [("s0.png", {"covid"}, None, {}), ("s0.png", {"normal"}, None, {}), ("covid/s0.png", {"normal"}, None, {})],
        [("covid/s0.png", {"normal"}, None, {}), ("s0.png", {"covid"}, None, {}), ("s0.png", {"normal"}, None, {})],
    ],
    ids=["the contradiction first", "the other key first"],
)
def test_a_scan_whose_rows_contradict_each_other_is_left_out_whichever_key_spells_it(rows):
    """A key whose own rows disagree was set aside before it was looked up: the scan it names was
    then audited with the label another spelling of its name gave."""
    preds = predictions("covid", ["covid/s0.png", "covid/s1.png", "covid/s2.png"])
    t = table([*rows, ("s1.png", {"covid"}, None, {}), ("s2.png", {"normal"}, None, {})])
    cohort, report = join(preds, t)
    assert report.matched == 2 and sorted(cohort.scan_ids.tolist()) == [2, 3]  # s1 and s2
    assert sorted(line for c in report.conflicts for line in c.lines) == [2, 3, 4]  # line 1: the header
    assert accounted_rows(report) == report.label_rows == 5


def test_every_row_of_a_scan_left_out_for_a_conflict_is_counted_in_it():
    """A third key for a scan already left out was counted nowhere: 12 label rows, 9 matched, two
    lines in conflict, none else."""
    preds = predictions("covid", ["covid/s0.png", "covid/s1.png"])
    t = table([
        ("s0.png", {"covid"}, None, {}),
        ("covid/s0.png", {"normal"}, None, {}),
        ("/data/x/covid/s0.png", {"normal"}, None, {}),
        ("s1.png", {"covid"}, None, {}),
    ])  # fmt: skip
    cohort, report = join(preds, t)
    assert cohort.scan_ids.tolist() == [2]  # s1
    assert [c.lines for c in report.conflicts] == [(2, 3, 4)]
    assert accounted_rows(report) == report.label_rows == 4


@pytest.mark.parametrize("contradiction_first", [False, True], ids=["agreeing keys first", "contradiction first"])
def test_the_rows_of_a_scan_left_out_are_all_in_its_conflict_in_whatever_order_they_come(contradiction_first):
    """A row agreeing with the scan's first key was counted as an identical duplicate when the
    contradiction came after it, and in the conflict when it came before."""
    agreeing = [("s0.png", {"covid"}, None, {}), ("covid/s0.png", {"covid"}, None, {})]
    contradicting = [("/data/covid/s0.png", {"covid"}, None, {}), ("/data/covid/s0.png", {"normal"}, None, {})]
    s0 = contradicting + agreeing if contradiction_first else agreeing + contradicting
    cohort, report = join(predictions("covid", ["covid/s0.png", "covid/s1.png"]),
                          table([*s0, ("s1.png", {"covid"}, None, {})]))  # fmt: skip
    assert cohort.scan_ids.tolist() == [2]
    assert [c.lines for c in report.conflicts] == [(2, 3, 4, 5)] and report.identical_duplicates == 0
    assert accounted_rows(report) == report.label_rows == 5


def test_binary_truth_from_either_label_and_only_the_positive_label_reported():
    preds = predictions("covid", ["a.png", "b.png", "c.png"])
    t = table(
        [("a.png", {"covid"}, None, {}), ("b.png", {"normal"}, None, {}), ("c.png", set(), frozenset({"normal"}), {})]
    )
    cohort, _ = join(preds, t)
    assert cohort.labels == ("covid",)
    assert cohort.y[:, 0].tolist() == [1, 0, 1]
    np.testing.assert_array_equal(cohort.probabilities[:, 0], preds.probabilities[:, 1])


def test_a_binary_row_with_both_labels_stated_0_names_its_line_as_one_with_both_1_does():
    """covid 0 and normal 0 counted the scan as a negative, without a word."""
    preds = predictions("covid", ["a.png", "b.png"])
    both_known = frozenset({"covid", "normal"})
    neither = table([("a.png", {"covid"}, both_known, {}), ("b.png", set(), both_known, {})])
    with pytest.raises(
        LabelFileError, match=r"labels.csv, line 3: a binary task's scan is normal or covid; this row is neither"
    ):
        join(preds, neither)
    with pytest.raises(LabelFileError, match=r"line 2: a binary task's scan is normal or covid, not both"):
        join(preds, table([("a.png", {"covid", "normal"}, both_known, {})]))


def test_multilabel_unknown_values_stay_unknown():
    preds = predictions("chestxray14", ["a.png"])
    t = table([("a.png", {"Mass"}, frozenset({"Mass", "Effusion"}), {})])
    cohort, _ = join(preds, t)
    row = dict(zip(cohort.labels, cohort.y[0].tolist(), strict=True))
    assert row["Mass"] == 1 and row["Effusion"] == 0 and row["Hernia"] == -1


def test_a_multiclass_row_of_0_1_columns_with_blank_cells_knows_every_class():
    """One column per class with the true class's cell set to 1 and the others blank: its one class
    known, the others are not it. Left unknown, every class lost its negatives (n = its positives,
    AUC undefined) while the confusion matrix counted every row."""
    preds = predictions("busi", ["a.png", "b.png"])
    t = table([("a.png", {"benign"}, frozenset({"benign"}), {}), ("b.png", {"normal"}, frozenset({"normal"}), {})])
    cohort, _ = join(preds, t)
    assert cohort.labels == ("benign", "malignant", "normal")
    assert cohort.y.tolist() == [[1, 0, 0], [0, 0, 1]]


def test_a_multiclass_row_with_blank_cells_and_one_with_zeros_for_one_scan_are_duplicates_not_a_conflict():
    preds = predictions("busi", ["busi/a.png"])
    every_class = frozenset({"benign", "malignant", "normal"})
    t = table([("a.png", {"benign"}, frozenset({"benign"}), {}), ("a.png", {"benign"}, every_class, {}),
               ("busi/a.png", {"benign"}, every_class, {})])  # fmt: skip
    cohort, report = join(preds, t)
    assert report.conflicts == [] and report.matched == 1 and cohort.y.tolist() == [[1, 0, 0]]


def test_a_multilabel_row_with_blank_cells_and_one_with_zeros_still_conflict():
    preds = predictions("chestxray14", ["a.png", "b.png"])
    t = table([("a.png", {"Mass"}, frozenset({"Mass"}), {}), ("a.png", {"Mass"}, frozenset({"Mass", "Effusion"}), {}),
               ("b.png", set(), None, {})])  # fmt: skip
    _, report = join(preds, t)
    assert [c.key for c in report.conflicts] == ["a.png"]


def test_a_multiclass_row_without_exactly_one_class_names_its_line():
    preds = predictions("busi", ["a.png"])
    with pytest.raises(LabelFileError, match=r"labels.csv, line 2: a multiclass scan has exactly one class"):
        join(preds, table([("a.png", {"benign", "normal"}, None, {})]))


def test_a_label_of_another_task_names_its_line():
    preds = predictions("busi", ["a.png"])
    with pytest.raises(LabelFileError, match=r"line 2: 'Mass' is not a label of this task"):
        join(preds, table([("a.png", {"Mass"}, None, {})]))


def test_nothing_matched_is_an_error_not_an_empty_audit():
    with pytest.raises(AuditInputError, match=r"no label row of labels\.csv matched"):
        join(predictions("busi", ["a.png"]), table([("b.png", {"benign"}, None, {})]))


def test_join_by_sha256_and_sop_instance_uid():
    preds = predictions("busi", ["a.png", "b.png"])
    by_sha, _ = join(preds, table([(f"{1:064X}", {"normal"}, None, {})], key="sha256"))
    assert by_sha.scan_ids.tolist() == [2]
    by_uid, _ = join(preds, table([("1.2.0", {"normal"}, None, {})], key="sop_instance_uid"))
    assert by_uid.scan_ids.tolist() == [1]


def test_patients_from_the_labels_file_first_then_the_stored_patient_id():
    preds = predictions("busi", ["a.png", "b.png", "c.png", "d.png"], patients=["S1", "S1", None, None])
    t = table(
        [(k, {"benign"}, None, {"patient_id": p}) for k, p in (("a.png", ""), ("b.png", ""), ("c.png", "L1"),
                                                               ("d.png", "L1"))],
        attributes=("patient_id",),
    )  # fmt: skip
    cohort, _ = join(preds, t)
    assert cohort.n_clusters == 2
    assert cohort.clusters[0] == cohort.clusters[1] and cohort.clusters[2] == cohort.clusters[3]


@pytest.mark.parametrize("column", ["patient_id", "Patient ID", "PatientID", "MRN", "Patient_ID"])
def test_patients_are_read_from_the_column_that_names_them_however_it_is_spelt(column):
    """The column ``--by`` refuses as identifying patients is the one the intervals cluster on: read
    only as ``patient_id``, three scans of each patient were taken for independent ones."""
    names = [f"s{i}.png" for i in range(12)]
    t = table([(nm, {"benign"}, None, {column: f"P{i // 3}"}) for i, nm in enumerate(names)], attributes=(column,))
    cohort, _ = join(predictions("busi", names), t)
    assert cohort.n_clusters == 4


def test_a_full_name_two_stored_scans_share_is_ambiguous_as_a_base_name_is():
    """The same name arrived twice with other bytes: which scan the label is for cannot be told."""
    preds = predictions("busi", ["busi/a.png", "busi/a.png", "busi/b.png"])
    for key in ("busi/a.png", "a.png"):
        cohort, report = join(preds, table([(key, {"benign"}, None, {}), ("busi/b.png", {"normal"}, None, {})]))
        assert cohort.scan_ids.tolist() == [3] and report.ambiguous == [key], key


@pytest.mark.parametrize(
    ("task", "folders"),
    [("busi", ("benign", "malignant")), ("covid", ("covid", "normal")), ("busi", ("Benign", "Malignant"))],
)
def test_a_key_in_one_class_folder_does_not_name_a_scan_evaluated_in_another(task, folders):
    """Folder-per-class datasets reuse file names across classes: ``malignant/1.png`` found the scan
    evaluated as ``benign/1.png`` by its base name, scored it as malignant, and made the right row
    for it a conflict; so did ``normal/4.png`` for ``covid/4.png`` (a class named as its task), and
    ``Benign/4.png`` for ``Malignant/4.png`` (class folders in another case)."""
    one, other = folders
    names = [f"{one}/1.png", f"{other}/2.png", f"{other}/4.png"]
    preds = predictions(task, names, read_in_place=True)
    truth = one.lower() if one.lower() in BUILTIN_TASKS[task].labels else "normal"
    cohort, report = join(
        preds,
        table([
            (f"{one}/1.png", {truth}, None, {}),
            (f"{other}/1.png", {truth}, None, {}),
            (f"{one}/4.png", {truth}, None, {}),
        ]),
    )  # fmt: skip
    assert report.conflicts == [] and report.labels_without_prediction == [f"{other}/1.png", f"{one}/4.png"]
    assert cohort.scan_ids.tolist() == [1]


def test_a_key_in_a_class_folder_names_the_scan_that_arrived_in_the_inbox_s_task_folder():
    """The daemon stores names as they arrived in the inbox, under its task folders; a labels file
    written from the dataset keys them by its class folders."""
    preds = predictions("busi", ["busi/benign (1).png", "busi/malignant (1).png"])
    cohort, report = join(
        preds,
        table(
            [("benign/benign (1).png", {"benign"}, None, {}), ("malignant/malignant (1).png", {"malignant"}, None, {})]
        ),
    )
    assert report.matched == 2 and sorted(cohort.scan_ids.tolist()) == [1, 2]
