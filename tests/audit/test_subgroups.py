"""Subgroups: levels from the labels file or the stored metadata, age bands, insufficient levels."""

import numpy as np
import pytest

from audit_factory import label_table as table
from audit_factory import stored_predictions as predictions
from meddaemon.audit.join import join
from meddaemon.audit.predictions import AuditInputError
from meddaemon.audit.subgroups import age_band, available_columns, grouping_values, subgroups
from meddaemon.audit.values import Undefined


@pytest.mark.parametrize(
    ("value", "band"),
    [("58", "40-59"), ("058Y", "40-59"), ("006M", "0-17"), ("17", "0-17"), ("18", "18-39"), ("080Y", "80+"),
     ("0,5", "0-17"), ("45,5", "40-59"), ("", "(missing)"), (" ", "(missing)"), (None, "(missing)"),
     ("old", "(unreadable)"), ("61 years", "(unreadable)"), ("-3", "(unreadable)"), ("250", "(unreadable)")],
)  # fmt: skip
def test_age_bands_from_years_or_dicom_ages(value, band):
    """An age given but unreadable, and a decimal comma's (``45,5``: a semicolon file of a
    decimal-comma locale), were counted among the ages not given, "(missing)", without a word."""
    assert age_band(value) == band


def cohort(n=200, seed=0):
    rng = np.random.default_rng(seed)
    names = [f"s{i}.png" for i in range(n)]
    y = rng.random(n) < 0.4
    probs = np.stack([1 - y * 0.6 - rng.random(n) * 0.4, y * 0.6 + rng.random(n) * 0.4], axis=1)
    preds = predictions("covid", names, probs=probs)
    sites = ["north" if i < 170 else "south" for i in range(n)]
    t = table(
        [(nm, {"covid" if yy else "normal"}, None, {"site": s}) for nm, yy, s in zip(names, y, sites, strict=True)],
        attributes=("site",),
    )
    return join(preds, t)[0]


def test_each_level_gets_metrics_and_small_levels_are_insufficient():
    groups = subgroups(cohort(), ["site"], min_n=40)
    by_level = {g.level: g for g in groups}
    assert by_level["north"].n == 170 and by_level["north"].metrics is not None
    south = by_level["south"]
    assert south.metrics is None and isinstance(south.insufficient, Undefined)
    assert south.insufficient.reason.startswith("insufficient: 30 labelled scans, fewer than the minimum 40")
    assert south.insufficient.counts["n"] == 30


def test_subgroup_metrics_are_the_metrics_of_that_subset():
    c = cohort()
    groups = subgroups(c, ["site"], min_n=10)
    north = next(g for g in groups if g.level == "north")
    from sklearn.metrics import roc_auc_score

    assert north.metrics.auc.value == pytest.approx(roc_auc_score(c.y[:170, 0], c.probabilities[:170, 0]))


def test_stored_metadata_is_used_when_the_labels_file_has_no_such_column():
    values = grouping_values(cohort(), "sex")
    assert set(values.tolist()) == {"F"}


@pytest.mark.parametrize("column", ["sex", "Sex", "SEX", "Patient Gender"])
def test_the_labels_file_s_column_comes_before_the_stored_metadata_however_it_is_spelt(column):
    """The stored sex is "F" for every scan (PNG scans have none at all): a file's ``Sex`` column was
    passed over for it, and every scan grouped under one level without a word."""
    names = [f"s{i}.png" for i in range(40)]
    rows = [(nm, {"normal"}, None, {column: "MF"[i % 2]}) for i, nm in enumerate(names)]
    c = join(predictions("covid", names), table(rows, attributes=(column,)))[0]
    assert sorted(set(grouping_values(c, "sex").tolist())) == ["F", "M"]


@pytest.mark.parametrize("column", ["age", "Age", "Patient Age", "patient_age"])
def test_age_bands_come_from_the_labels_file_s_age_column_however_it_is_spelt(column):
    names = [f"s{i}.png" for i in range(40)]
    rows = [(nm, {"normal"}, None, {column: "70"}) for nm in names]
    preds = predictions("covid", names)
    preds.scan_attributes["age"] = ["030Y"] * 40
    c = join(preds, table(rows, attributes=(column,)))[0]
    assert set(grouping_values(c, "age_band").tolist()) == {"60-79"}


def test_an_unknown_column_names_what_is_available():
    with pytest.raises(AuditInputError, match=r"no column 'scanner' to group by.*available: .*site"):
        grouping_values(cohort(), "scanner")


def nih_cohort():
    names = [f"{i:08d}_000.png" for i in range(40)]
    rows = [(nm, {"Effusion"} if i % 3 == 0 else set(), None, {"sex": "MF"[i % 2], "view": "PA"})
            for i, nm in enumerate(names)]  # fmt: skip
    return join(predictions("chestxray14", names), table(rows, attributes=("sex", "view")))[0]


@pytest.mark.parametrize("name", ["Patient Gender", "sex", "SEX", "patient_gender", "View Position"])
def test_a_column_is_found_by_its_name_in_the_file_or_its_normalised_name(name):
    groups = subgroups(nih_cohort(), [name], min_n=1)
    expected = "view" if name == "View Position" else "sex"
    assert {g.by for g in groups} == {expected}
    assert {g.level for g in groups} == ({"PA"} if expected == "view" else {"F", "M"})


@pytest.mark.parametrize(
    "column",
    [
        "Patient Name",
        "PatientName",
        "Patient's Birth Date",
        "DOB",
        "date_of_birth",
        "AccessionNumber",
        "Accession #",
        "Patient Address",
        "Patient Telephone Numbers",
        "phone_number",
        "Other Patient IDs",
        "family_name",
        "Patient Telephone Number",
        "Patient Phone",
        "Patient DOB",
        "Patient Date of Birth",
        "Birthday",
        "Patient First Name",
        "Patient Surname",
        "Medical Record Number",
        "Patient MRN",
        "Patient's Telephone Numbers",
        "Patient's DOB",
        "Patients Phone",
        "Patient Identifier",  # each of these printed every patient's as a level of the audit
        "MRN Number",
        "Birthdate (YYYY-MM-DD)",
        "Tel",
        "Subject ID",
        "Date of Birth",
        "E-mail",
        "Home Address",
        "Patient No.",
        "medicalRecordNo",
        "Name",
        "Mobile Phone",
        "Patient Email Address",
    ],
)
def test_no_subgroup_by_a_column_of_patient_names_birth_dates_or_accessions(column):
    """Only identifier columns were refused: ``--by "Patient Name"`` printed every name as a level,
    in the table, the JSON, the PDF and the stored audit the console's viewers see."""
    names = [f"s{i}.png" for i in range(60)]
    preds = predictions("covid", names, probs=np.tile([0.7, 0.3], (60, 1)))
    value = "SYNTHETIC^PERSON"
    t = table([(nm, {"normal"}, None, {column: value}) for nm in names], attributes=(column,))
    c = join(preds, t)[0]
    with pytest.raises(AuditInputError, match="identifies patients") as refused:
        subgroups(c, [column], min_n=30)
    assert value not in str(refused.value)
    assert column not in available_columns(c)


@pytest.mark.parametrize(
    "column",
    [
        "site", "site_name", "Station Name", "Patient Gender", "View Position", "Manufacturer Model Name",
        "Birth Weight", "Medical Center ID", "Medical Centre No", "Country of Birth", "Place of Birth", "Phone Model",
        "Medical history (yes/no)", "Patient smoker (yes/no)", "Case Number of lesions", "Number of Patients in Study",
    ],
)  # fmt: skip
def test_columns_patients_share_still_group(column):
    names = [f"s{i}.png" for i in range(60)]
    preds = predictions("covid", names, probs=np.tile([0.7, 0.3], (60, 1)))
    t = table(
        [(nm, {"normal"}, None, {column: "A" if i % 2 else "B"}) for i, nm in enumerate(names)], attributes=(column,)
    )
    groups = subgroups(join(preds, t)[0], [column], min_n=1)
    assert {g.level for g in groups} == {"A", "B"}


def test_an_unknown_column_suggests_the_close_one():
    with pytest.raises(AuditInputError, match=r"no column 'Patient Gendr'.*did you mean 'Patient Gender'"):
        grouping_values(nih_cohort(), "Patient Gendr")


@pytest.mark.parametrize("given", ["patient_id", "Patient ID", "PATIENT-ID", "PatientID", "MRN"])
def test_no_subgroup_by_patient_identifier_its_levels_would_print_them(given):
    names = [f"s{i}.png" for i in range(60)]
    preds = predictions("covid", names, probs=np.tile([0.7, 0.3], (60, 1)))
    t = table([(nm, {"normal"}, None, {"Patient ID": "MRN-0001"}) for nm in names], attributes=("Patient ID",))
    c = join(preds, t)[0]
    with pytest.raises(AuditInputError, match="identif") as refused:
        subgroups(c, [given], min_n=30)
    assert "MRN-0001" not in str(refused.value)
    assert grouping_values(c, "sex") is not None  # other columns still group
