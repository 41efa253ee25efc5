"""``medcli audit`` end to end: SYNTHETIC stored predictions in a real SQLite/PostgreSQL database,
label files written by the test, the CLI through click's CliRunner, the PDF read back with pypdf.
What is read and stored runs on both databases; what is only written out (tables, PDFs, CSVs, outputs
that cannot be written) on SQLite alone."""

import csv
import hashlib
import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pypdf import PdfReader
from sklearn.metrics import roc_auc_score
from sqlalchemy import select, text

from audit_factory import add_version, synthetic_cohort, synthetic_scores, write_predictions
from meddaemon.cli.medcli import cli
from meddaemon.db.engine import session_factory
from meddaemon.db.models import Audit, AuditPdf
from meddaemon.engine.tasks import NIH_FINDINGS
from permissions import held_to_file_modes, unlistable


def run(*args):
    result = CliRunner().invoke(cli, ["audit", *args], catch_exceptions=False)
    return result


def busi_labels(tmp_path, cohort, name="labels.csv"):
    path = tmp_path / name
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", "sex", "patient_id", "site"])
        for i, n in enumerate(cohort.names):
            w.writerow([n.split("/")[-1], cohort.labels[cohort.truth[i]], cohort.sexes[i], cohort.patient_ids[i],
                        "north" if i % 4 else "south"])  # fmt: skip
    return path


@pytest.fixture
def busi(migrated_engine, db_url, tmp_path):
    cohort = synthetic_cohort(migrated_engine, "busi", 240, seed=1)
    return db_url, busi_labels(tmp_path, cohort), cohort, migrated_engine


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_stored_probabilities_outside_0_to_1_are_refused_by_name_not_a_traceback(migrated_engine, db_url, tmp_path):
    """A database written by another route held -0.2: np.bincount's ValueError, exit 1, a traceback."""
    version = add_version(migrated_engine, "covid", "v1")
    probabilities = np.array([[0.7, 0.3], [1.2, -0.2], [0.1, 0.9]])  # SYNTHETIC, the second row impossible
    ids = write_predictions(migrated_engine, "covid", version, ["a.png", "b.png", "c.png"], probabilities,
                            probabilities >= 0.5)  # fmt: skip
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\na.png,normal\nb.png,covid\nc.png,covid\n")
    result = CliRunner().invoke(cli, ["audit", "--db", db_url, "--labels", str(labels)])
    assert result.exit_code == 2, result.output
    assert "model version covid/v1 has 2 stored probabilities outside 0 to 1" in result.stderr
    assert f"(scan {ids[1]}, " in result.stderr and "Traceback" not in result.output


def test_audit_json_csv_pdf_and_the_stored_row(busi, tmp_path):
    db_url, labels, cohort, engine = busi
    pdf, tidy = tmp_path / "audit.pdf", tmp_path / "audit.csv"
    result = run("--db", db_url, "--labels", str(labels), "--by", "sex,site", "--bootstrap", "100",
                 "--json", "--csv", str(tidy), "--pdf", str(pdf))  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["task"] == "busi" and data["join"]["matched"] == 240 and data["passed"] is None
    assert data["patients"] == len(set(cohort.patient_ids))
    for j, entry in enumerate(data["labels"]):
        assert entry["auc"]["value"] == pytest.approx(roc_auc_score(cohort.truth == j, cohort.probabilities[:, j]))
        assert entry["auc"]["ci_method"].startswith("cluster-bootstrap-percentile (B=100")
    assert (
        data["multiclass"]["confusion_matrix"]
        == np.bincount(cohort.truth * 3 + cohort.probabilities.argmax(axis=1), minlength=9).reshape(3, 3).tolist()
    )
    levels = {(g["by"], g["level"]) for g in data["subgroups"]}
    assert levels == {("sex", "F"), ("sex", "M"), ("site", "north"), ("site", "south")}

    rows = list(csv.DictReader(tidy.open()))
    overall_auc = [r for r in rows if r["scope"] == "overall" and r["metric"] == "auc"]
    assert [r["label"] for r in overall_auc] == ["benign", "malignant", "normal"]
    assert float(overall_auc[0]["value"]) == pytest.approx(data["labels"][0]["auc"]["value"])

    reader = PdfReader(str(pdf))
    assert len(reader.pages) == 5  # summary, ROC, reliability, forest, confusion matrix
    text = "\n".join(page.extract_text() for page in reader.pages)
    for expected in ("Audit: busi (multiclass)", "ROC curves", "Reliability diagrams", "Subgroup forest plot",
                     "Confusion matrix", "malignant"):  # fmt: skip
        assert expected in text

    with session_factory(engine)() as session:
        stored = session.scalars(select(Audit)).one()
    assert stored.id == data["audit_id"]
    assert stored.labels_sha256 == hashlib.sha256(labels.read_bytes()).hexdigest()
    assert stored.parameters["by"] == ["sex", "site"] and stored.parameters["bootstrap"] == 100
    assert stored.results["labels"][0]["auc"]["value"] == pytest.approx(data["labels"][0]["auc"]["value"])
    assert stored.predictions_sha256 == data["inputs"]["predictions_sha256"]
    with session_factory(engine)() as session:
        kept = session.get(AuditPdf, stored.id)
    assert kept is not None and kept.data == pdf.read_bytes()  # the PDF is kept with the audit, for the console
    assert (kept.pages, kept.size_bytes, kept.sha256) == (5, pdf.stat().st_size, hashlib.sha256(kept.data).hexdigest())


def test_patients_with_several_scans_get_the_clustered_bootstrap_by_default(busi):
    db_url, labels, cohort, _ = busi
    result = run("--db", db_url, "--labels", str(labels), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["bootstrap_resamples"] == 2000
    assert data["labels"][0]["sensitivity"]["ci_method"] == "cluster-bootstrap-percentile (B=2000) union wilson"
    patients = len(set(cohort.patient_ids))
    assert patients < 240
    assert any(f"2000 resamples of {patients} patients" in note for note in data["notes"])


def test_require_exits_5_when_a_lower_bound_fails_and_0_when_all_hold(busi):
    db_url, labels, _, engine = busi
    ok = run("--db", db_url, "--labels", str(labels), "--bootstrap", "0", "--require", "auc>=0.6,sensitivity>=0.3")
    assert ok.exit_code == 0, ok.output
    assert "PASS auc>=0.6 [benign]" in ok.stdout and "FAIL" not in ok.stdout
    bad = run("--db", db_url, "--labels", str(labels), "--bootstrap", "0", "--require", "auc>=0.6,sensitivity>=0.99")
    assert bad.exit_code == 5
    assert "FAIL sensitivity>=0.99 [benign]" in bad.stdout
    with session_factory(engine)() as session:
        assert [a.passed for a in session.scalars(select(Audit).order_by(Audit.id))] == [True, False]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_pdf_shows_every_verdict_however_many_and_page_1_says_how_many_failed_past_it(busi, tmp_path):
    """Five criteria on three classes: fifteen verdicts. Page 1 had room for 14 summary lines and
    the rest were dropped without a word, failures among them."""
    db_url, labels, _, _ = busi
    pdf = tmp_path / "audit.pdf"
    criteria = "auc>=0.6,sensitivity>=0.3,specificity>=0.99,ppv>=0.3,npv>=0.3"
    result = run("--db", db_url, "--labels", str(labels), "--bootstrap", "0", "--require", criteria, "--pdf", str(pdf))
    assert result.exit_code == 5, result.output
    verdicts = re.findall(r"^(?:PASS|FAIL) \S+ \[\w+\]", result.stdout, flags=re.MULTILINE)
    assert len(verdicts) == 15 and any(v.startswith("FAIL") for v in verdicts)
    pages = [" ".join(page.extract_text().split()) for page in PdfReader(str(pdf)).pages]
    assert all(v in " ".join(pages) for v in verdicts)
    continued = next(i for i, page in enumerate(pages) if page.startswith("Summary (continued)"))
    past_page_1 = sum(page.count("FAIL ") for page in pages[continued:])
    assert continued == 1 and past_page_1 > 0
    assert f"more lines on the next page ({past_page_1} FAIL)" in pages[0]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("option", ["--pdf", "--csv"])
def test_an_output_that_cannot_be_written_exits_1_before_any_audit_is_stored(busi, tmp_path, option):
    """Found after the audit ran, it was a traceback (exit 1 whatever --require said) and an audit
    stored without the file asked for. A folder that does not exist yet is made, as report --out does."""
    db_url, labels, _, engine = busi
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"")
    result = run("--db", db_url, "--labels", str(labels), "--bootstrap", "0", option, str(blocker / "out"))
    assert result.exit_code == 1 and f"{option} {blocker / 'out'} cannot be written" in result.stderr
    assert "Traceback" not in result.output
    with session_factory(engine)() as session:
        assert session.scalars(select(Audit)).all() == []
    made = tmp_path / "new" / "folder" / "out"
    result = run(
        "--db", db_url, "--labels", str(labels), "--bootstrap", "0", "--require", "auc>=0.99", option, str(made)
    )
    assert result.exit_code == 5 and made.stat().st_size > 0


def test_the_terminal_table_and_the_patient_note(busi):
    db_url, labels, _, _ = busi
    result = run("--db", db_url, "--labels", str(labels), "--bootstrap", "0")
    assert result.exit_code == 0, result.output
    assert (
        "Metrics (95% intervals; AUPRC, Brier and ECE: point values, no interval)" in result.stdout
        and "benign" in result.stdout
    )
    assert "patients have several scans" in result.stdout
    assert "audit 1 stored" in result.stdout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name,label\nx.png,benign\n", "line 1: no key column: expected one of file, sop_instance_uid, sha256"),
        (
            "file,label\nsynthetic_0.png,benign\nsynthetic_1.png,tumour\n",
            "line 3, column 'label': unknown label 'tumour'",
        ),
        ("file,label\nnot_stored.png,benign\n", "no label row of"),
        (  # it listed every task's labels, 14 findings among them, and meant none
            "file,label\nsynthetic_0.png,bengin\n",
            "unknown label 'bengin'; did you mean 'benign'? expected one of: benign, malignant, normal\n",
        ),
    ],
)
def test_a_bad_labels_file_exits_2_naming_the_file_and_line(busi, tmp_path, text, expected):
    db_url = busi[0]
    path = tmp_path / "bad.csv"
    path.write_text(text)
    result = run("--db", db_url, "--labels", str(path), "--task", "busi")
    assert result.exit_code == 2
    assert str(path) in result.stderr and expected in result.stderr


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_labels_file_of_several_tasks_is_audited_for_the_task_given(busi, tmp_path):
    """A site's one labels file for its tasks: rows of another task's labels, with no prediction of
    this one, are read and left unjoined (they were, until an unknown label was named against the
    given task's labels only)."""
    db_url, labels, _, _ = busi
    shared = tmp_path / "shared.csv"
    shared.write_text(labels.read_text() + "covid_0001.png,covid,F,PC1,north\ncovid_0002.png,normal,M,PC2,south\n")
    result = run("--db", db_url, "--labels", str(shared), "--task", "busi", "--bootstrap", "0")
    assert result.exit_code == 0, result.output
    assert "240 matched" in result.stdout


def test_conflicts_and_missing_predictions_are_reported_not_fatal(busi, tmp_path):
    db_url, labels, _, _ = busi
    path = tmp_path / "messy.csv"
    lines = labels.read_text().splitlines()
    extra = ["synthetic_0.png,normal,F,P0,north", "ghost.png,benign,F,PX,north"]
    first = lines[1].split(",")
    if first[1] == "normal":
        extra[0] = extra[0].replace("normal", "benign")
    path.write_text("\n".join([*lines, *extra]) + "\n")
    result = run("--db", db_url, "--labels", str(path), "--bootstrap", "0", "--json")
    assert result.exit_code == 0, result.output
    join = json.loads(result.stdout)["join"]
    assert join["matched"] == 239 and join["predictions_without_label"] == 0  # synthetic_0's labels conflict
    assert join["labels_without_prediction_examples"] == ["ghost.png"]
    assert join["conflicts"][0]["key"] == "synthetic_0.png" and join["conflicts"][0]["lines"] == [2, 242]


def test_unknown_group_column_and_bad_criteria_exit_2(busi):
    db_url, labels, _, _ = busi
    result = run("--db", db_url, "--labels", str(labels), "--by", "scanner")
    assert result.exit_code == 2 and "no column 'scanner'" in result.stderr
    result = run("--db", db_url, "--labels", str(labels), "--require", "auc=0.9")
    assert result.exit_code == 2 and "cannot read criterion" in result.stderr


def test_an_empty_require_is_refused_not_passed(busi):
    """`--require "$CRITERIA"` with the variable unset passed, exit 0, as if no criterion had been
    asked (one space, or `medcli evaluate --audit --require ""`, were refused)."""
    db_url, labels, _, _ = busi
    result = run("--db", db_url, "--labels", str(labels), "--bootstrap", "0", "--require", "")
    assert result.exit_code == 2 and "--require is empty" in result.stderr


def test_a_multiclass_audit_says_its_calls_are_the_argmax_not_a_threshold(busi):
    """The stored 0.5 of each class was shown as the calls' threshold, beside calls of the argmax
    that no probability reached 0.5 for."""
    db_url, labels, _, _ = busi
    data = json.loads(run("--db", db_url, "--labels", str(labels), "--bootstrap", "0", "--json").stdout)
    assert [(m["label"], m["threshold"]) for m in data["labels"]] == [
        ("benign", None), ("malignant", None), ("normal", None)
    ]  # fmt: skip
    table = run("--db", db_url, "--labels", str(labels), "--bootstrap", "0").stdout
    metrics = table.split("Metrics", 1)[1].split("Multiclass", 1)[0]
    assert metrics.count("argmax") == 3 and "0.50 " not in metrics


def test_compare_and_time_windows(busi):
    db_url, labels, cohort, engine = busi
    _, probs, calls = synthetic_scores("busi", 240, seed=9, separation=0.3)
    vid = add_version(engine, "busi", "v2", status="registered")
    write_predictions(engine, "busi", vid, cohort.names, probs, calls)
    result = run("--db", db_url, "--labels", str(labels), "--bootstrap", "0", "--compare", "v2", "--json",
                 "--cohort-a", "2026-01-01..2026-01-31", "--cohort-b", "2026-02-01..2026-03-31")  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    benign = data["comparison"][0]
    assert benign["n"] == 240 and benign["auc_b"] == pytest.approx(roc_auc_score(cohort.truth == 0, probs[:, 0]))
    assert benign["difference"]["value"] > 0 and benign["p_value"] < 0.05
    assert data["shift"]["a"] == "2026-01-01..2026-01-31"
    assert data["shift"]["labels"][0]["a"]["n"] + data["shift"]["labels"][0]["b"]["n"] == 240


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_nih_data_entry_with_an_undefined_label(migrated_engine, db_url, tmp_path):
    n = 150
    truth, probs, calls = synthetic_scores("chestxray14", n, seed=4)
    truth[:, NIH_FINDINGS.index("Hernia")] = 0
    names = [f"chestxray14/{i:08d}_000.png" for i in range(n)]
    vid = add_version(migrated_engine, "chestxray14", "d1")
    write_predictions(migrated_engine, "chestxray14", vid, names, probs, calls)
    path = tmp_path / "Data_Entry_2017.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        header = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        w.writerow([*header.split(",")[:-1], "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]", ""])
        for i in range(n):
            found = "|".join(f for f, t in zip(NIH_FINDINGS, truth[i], strict=True) if t) or "No Finding"
            w.writerow([f"{i:08d}_000.png", found, 0, i, 30 + i % 50, "MF"[i % 2], "PA", 2048, 2048, 0.14, 0.14, ""])
    pdf = tmp_path / "audit.pdf"
    result = run("--db", db_url, "--labels", str(path), "--bootstrap", "0", "--json", "--by", "sex,age_band",
                 "--pdf", str(pdf))  # fmt: skip
    assert result.exit_code == 0, result.output
    text = "\n".join(page.extract_text() for page in PdfReader(str(pdf)).pages)
    assert "Audit: chestxray14 (multilabel)" in text and "Pleural_Thickening" in text
    assert "AUC undefined" in text  # Hernia's ROC panel
    data = json.loads(result.stdout)
    assert data["task"] == "chestxray14" and len(data["labels"]) == 14
    hernia = next(entry for entry in data["labels"] if entry["label"] == "Hernia")
    assert hernia["auc"] == {"value": None, "undefined": "one class only: no positives",
                             "counts": {"n": n, "positives": 0, "negatives": n}}  # fmt: skip
    assert hernia["auprc"]["undefined"] == "no positives" and hernia["sensitivity"]["undefined"] == "no positives"
    mass = next(entry for entry in data["labels"] if entry["label"] == "Mass")
    j = NIH_FINDINGS.index("Mass")
    assert mass["auc"]["value"] == pytest.approx(roc_auc_score(truth[:, j], probs[:, j]))
    assert {g["by"] for g in data["subgroups"]} == {"sex", "age_band"}


def test_busi_folders(migrated_engine, db_url, tmp_path):
    cohort = synthetic_cohort(migrated_engine, "busi", 60, seed=2)
    root = tmp_path / "Dataset_BUSI_with_GT"
    for cls in cohort.labels:
        (root / cls).mkdir(parents=True)
    for i, name in enumerate(cohort.names):
        base = name.split("/")[-1]
        (root / cohort.labels[cohort.truth[i]] / base).write_bytes(b"SYNTHETIC")
        (root / cohort.labels[cohort.truth[i]] / base.replace(".png", "_mask.png")).write_bytes(b"SYNTHETIC")
    result = run("--db", db_url, "--labels-from-folders", str(root), "--bootstrap", "0", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["inputs"]["labels_format"] == "folders" and data["join"]["matched"] == 60


def test_busi_as_published_is_audited_for_the_binary_task_without_its_normal_folder(migrated_engine, db_url, tmp_path):
    """It was refused ("sub-folders must be classes (benign, malignant); found [..., 'normal']"),
    while retrain and dataset inspect read it; class folders in another case the same."""
    cohort = synthetic_cohort(migrated_engine, "busi_binary", 40, seed=3)
    root = tmp_path / "Dataset_BUSI_with_GT"
    for cls in ("Benign", "Malignant", "normal"):
        (root / cls).mkdir(parents=True)
    (root / "normal" / "normal (1).png").write_bytes(b"SYNTHETIC")
    for i, name in enumerate(cohort.names):
        label = cohort.labels[int(cohort.truth[i][1])]  # binary truth: (negative, positive)
        (root / label.title() / name.split("/")[-1]).write_bytes(b"SYNTHETIC")
    args = ("--db", db_url, "--labels-from-folders", str(root), "--task", "busi_binary", "--bootstrap", "0", "--json")
    result = run(*args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["join"]["matched"] == 40 and "normal/: not a class of the task, left out" in data["notes"]


def test_a_labelled_image_whose_bytes_arrived_under_another_name_is_found_by_them(migrated_engine, db_url, tmp_path):
    """The daemon saw the bytes first as busi/siteA/img.png; in the dataset they are "benign (3).png":
    listed as a label without prediction though the version had scored those very bytes."""
    cohort = synthetic_cohort(migrated_engine, "busi", 20, seed=4)
    root = tmp_path / "Dataset_BUSI_with_GT"
    for cls in cohort.labels:
        (root / cls).mkdir(parents=True)
    for i, name in enumerate(cohort.names):
        content = f"SYNTHETIC {i}".encode()
        renamed = i == 7
        (root / cohort.labels[cohort.truth[i]] / ("renamed.png" if renamed else name.split("/")[-1])).write_bytes(
            content
        )
        with migrated_engine.begin() as conn:
            conn.execute(text("UPDATE scans SET sha256 = :sha WHERE source_name = :name"),
                         {"sha": hashlib.sha256(content).hexdigest(), "name": name})  # fmt: skip
    result = run("--db", db_url, "--labels-from-folders", str(root), "--bootstrap", "0", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["join"]["matched"] == 20 and data["join"]["labels_without_prediction"] == 0


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_class_folder_this_user_cannot_list_is_named(migrated_engine, db_url, tmp_path):
    """Read past, its images would be missing from the truth: exit 2, the folder named."""
    root = tmp_path / "Dataset_BUSI_with_GT"
    for cls in ("benign", "malignant", "normal"):
        (root / cls).mkdir(parents=True)
        (root / cls / f"{cls} (1).png").write_bytes(b"SYNTHETIC")
    command = [str(Path(sys.executable).parent / "medcli"), "audit", "--db", db_url, "--labels-from-folders", str(root)]
    with unlistable(root / "malignant"):
        done = subprocess.run(held_to_file_modes(command), capture_output=True, text=True)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().endswith(f"{root / 'malignant'}: cannot be read (Permission denied)"), done.stderr


def test_database_unavailable_exits_3(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("file,label\na.png,benign\n")
    result = run("--db", "postgresql+psycopg://nobody@127.0.0.1:1/none", "--labels", str(path))
    assert result.exit_code == 3 and "database unavailable" in result.stderr


def test_help_explains_every_option():
    result = CliRunner().invoke(cli, ["audit", "--help"])
    assert result.exit_code == 0
    for option in ("--labels", "--labels-from-folders", "--by", "--min-n", "--at-sensitivity", "--bootstrap",
                   "--compare", "--cohort-a", "--cohort-b", "--require", "--json", "--csv", "--pdf"):  # fmt: skip
        assert option in result.output


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_ece_brier_and_auprc_are_said_to_have_no_interval_everywhere(busi, tmp_path):
    db_url, labels, _, _ = busi
    pdf, tidy = tmp_path / "audit.pdf", tmp_path / "audit.csv"
    result = run("--db", db_url, "--labels", str(labels), "--bootstrap", "50", "--json", "--csv", str(tidy),
                 "--pdf", str(pdf))  # fmt: skip
    assert result.exit_code == 0, result.output
    for entry in json.loads(result.stdout)["labels"]:
        assert entry["ece"]["lower"] is None and entry["ece"]["upper"] is None and entry["ece"]["ci_method"] is None
        assert entry["ece"]["method"] == "10 equal-width bins on [0, 1]"
        assert entry["brier"]["ci_method"] is None and entry["auc"]["lower"] < entry["auc"]["upper"]
    ece_rows = [r for r in csv.DictReader(tidy.open()) if r["metric"] == "ece"]
    assert ece_rows and all(r["lower"] == r["upper"] == r["ci_method"] == "" for r in ece_rows)
    summary = PdfReader(str(pdf)).pages[0].extract_text()
    assert "AUPRC, Brier and ECE (10 equal-width bins): point values, no interval" in " ".join(summary.split())
    table = run("--db", db_url, "--labels", str(labels), "--bootstrap", "0")
    assert "AUPRC, Brier and ECE: point values" in table.stdout


def test_a_misspelt_label_column_exits_2_naming_it(busi, tmp_path):
    db_url = busi[0]
    path = tmp_path / "wide.csv"
    path.write_text("file,benign,malignnt,normal\nsynthetic_0.png,1,0,0\n")
    result = run("--db", db_url, "--labels", str(path))
    assert result.exit_code == 2
    assert f"{path}, line 1, column 'malignnt': holds 0/1 values but is not a label" in result.stderr
    assert "did you mean 'malignant'?" in result.stderr


def test_by_takes_a_column_as_spelt_in_the_file(busi, tmp_path):
    db_url, labels, _, _ = busi
    spelt = tmp_path / "spelt.csv"
    spelt.write_text(labels.read_text().replace("file,label,sex,", "file,label,Patient Sex,", 1))
    result = run("--db", db_url, "--labels", str(spelt), "--bootstrap", "0", "--json", "--by", "patient sex")
    assert result.exit_code == 0, result.output
    assert {g["level"] for g in json.loads(result.stdout)["subgroups"]} == {"F", "M"}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_standard_output_that_cannot_be_written_is_named_so(busi):
    """A full disk or a closed pipe behind stdout has no file name: 'audit 16 is stored, but None'."""
    db_url, labels, _, _ = busi
    command = [sys.executable, "-m", "meddaemon.cli.medcli", "audit", "--db", db_url, "--labels", str(labels)]
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [*command, "--bootstrap", "0"], stdout=full, stderr=subprocess.PIPE, text=True, timeout=300
        )
    assert done.returncode == 1, done.stderr
    assert re.search(r"audit \d+ is stored, but standard output: No space left on device", done.stderr), done.stderr


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)  # the audit stored where no file limit reaches
def test_a_csv_that_cannot_be_written_is_named_not_standard_output(busi, tmp_path):
    """A write error on an open file has no file name either: the CSV's was blamed on standard output."""
    import resource

    db_url, labels, _, _ = busi
    out = tmp_path / "audit.csv"
    command = [sys.executable, "-m", "meddaemon.cli.medcli", "audit", "--db", db_url, "--labels", str(labels)]

    def small_files() -> None:  # a full disk, as far as the CSV goes
        resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))

    done = subprocess.run(
        [*command, "--bootstrap", "0", "--csv", str(out)],
        capture_output=True, text=True, timeout=300, preexec_fn=small_files,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert re.search(rf"audit \d+ is stored, but {re.escape(str(out))}: File too large", done.stderr), done.stderr


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("level", ["Ward $A_$", "Cost $5 and $10", "Ward [/]", "Ward [red]A", "Ward [bold]B"])
def test_a_subgroup_level_is_shown_as_written_in_the_table_and_the_pdf(busi, tmp_path, level):
    """Text from a labels file is data: a pair of ``$`` was typeset as mathematics (``$A_$`` stopped
    the PDF with a traceback), and square brackets were read as rich's markup (``[/]`` stopped the
    table; ``[red]`` vanished from the level shown)."""
    db_url, labels, _, _ = busi
    odd = tmp_path / "odd_levels.csv"
    with labels.open() as source, odd.open("w", newline="") as out:
        rows = list(csv.reader(source))
        w = csv.writer(out)
        w.writerow(rows[0])
        for i, row in enumerate(rows[1:]):
            w.writerow([*row[:4], level if i % 2 else "other"])
    pdf = tmp_path / "audit.pdf"
    result = run("--db", db_url, "--labels", str(odd), "--bootstrap", "0", "--by", "site", "--pdf", str(pdf))
    assert result.exit_code == 0, result.output
    assert re.search(rf"│ site\s+│ {re.escape(level)}\s+│ benign", result.stdout), result.stdout
    forest = next(p.extract_text() for p in PdfReader(str(pdf)).pages if "Subgroup forest plot" in p.extract_text())
    assert f"benign: site={level}" in forest
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_outputs_named_through_a_link_are_written_to_its_target_and_the_link_stays(busi, tmp_path):
    """They were written under a temporary name renamed over the link: the link became a file of its
    own and the file it pointed at kept its old contents."""
    db_url, labels, _, _ = busi
    (tmp_path / "runs").mkdir()
    named = {}
    for option, name in (("--csv", "latest.csv"), ("--pdf", "latest.pdf")):
        target = tmp_path / "runs" / name
        target.write_bytes(b"old")
        link = tmp_path / name
        link.symlink_to(target)
        named[option] = (link, target)
    outputs = [part for option, (link, _) in named.items() for part in (option, str(link))]
    result = run("--db", db_url, "--labels", str(labels), "--bootstrap", "0", *outputs)
    assert result.exit_code == 0, result.output
    for link, target in named.values():
        assert link.is_symlink() and link.resolve() == target
    assert next(csv.DictReader(named["--csv"][1].open()))["scope"] == "overall"
    assert named["--pdf"][1].read_bytes().startswith(b"%PDF")


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_csv_named_as_a_pipe_is_written_into_it(busi, tmp_path):
    """Renamed over the pipe, the CSV became a regular file there, its reader got nothing, and the
    audit said it had written it (exit 0)."""
    import os
    import stat
    import threading

    db_url, labels, _, _ = busi
    pipe = tmp_path / "audit.csv"
    os.mkfifo(pipe)
    read: list[str] = []
    reader = threading.Thread(target=lambda: read.append(pipe.read_text()), daemon=True)
    reader.start()
    result = run("--db", db_url, "--labels", str(labels), "--bootstrap", "0", "--csv", str(pipe))
    reader.join(30)
    assert result.exit_code == 0, result.output
    assert stat.S_ISFIFO(pipe.stat().st_mode)
    assert read and next(csv.DictReader(read[0].splitlines()))["scope"] == "overall"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_file_of_the_user_s_named_as_an_output_plus_tmp_is_kept(busi, tmp_path):
    """The check that an output can be written truncated and removed ``<output>.tmp``."""
    db_url, labels, _, _ = busi
    notes = [tmp_path / "audit.csv.tmp", tmp_path / "audit.pdf.tmp"]
    for note in notes:
        note.write_text("my notes")
    outputs = ["--csv", str(tmp_path / "audit.csv"), "--pdf", str(tmp_path / "audit.pdf")]
    result = run("--db", db_url, "--labels", str(labels), "--bootstrap", "0", *outputs)
    assert result.exit_code == 0, result.output
    assert [note.read_text() for note in notes] == ["my notes", "my notes"]
    assert sorted(p.name for p in tmp_path.glob("audit.*")) == [
        "audit.csv",
        "audit.csv.tmp",
        "audit.pdf",
        "audit.pdf.tmp",
    ]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_the_pdf_of_a_cohort_of_one_class_is_drawn_without_a_warning_on_stderr(migrated_engine, db_url, tmp_path):
    """No curve has a label to show: matplotlib's "No artists with labels found to put in legend"
    was printed on stderr, on every such audit."""
    cohort = synthetic_cohort(migrated_engine, "covid", 40, seed=3)
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\n" + "".join(f"{name.split('/')[-1]},covid\n" for name in cohort.names))
    pdf = tmp_path / "audit.pdf"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run("--db", db_url, "--labels", str(labels), "--bootstrap", "0", "--pdf", str(pdf))
    assert result.exit_code == 0, result.output
    assert [str(w.message) for w in caught if "legend" in str(w.message)] == []
    assert "covid" in "\n".join(page.extract_text() for page in PdfReader(str(pdf)).pages)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_finding_no_scan_is_labelled_for_is_undefined_in_the_pdf_as_in_the_json_never_nan(
    migrated_engine, db_url, tmp_path
):
    """A labels file without one finding's column: the PDF printed its AUPRC baseline as "nan"."""
    cohort = synthetic_cohort(migrated_engine, "chestxray14", 120, seed=2)
    kept = [label for label in cohort.labels if label != "Atelectasis"]
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", *kept])
        for i, name in enumerate(cohort.names):
            w.writerow([name.split("/")[-1], *(int(cohort.truth[i, cohort.labels.index(k)]) for k in kept)])
    pdf = tmp_path / "audit.pdf"
    result = run("--db", db_url, "--labels", str(labels), "--bootstrap", "0", "--json", "--pdf", str(pdf))
    assert result.exit_code == 0, result.output
    atelectasis = next(entry for entry in json.loads(result.stdout)["labels"] if entry["label"] == "Atelectasis")
    assert atelectasis["auprc"]["value"] is None
    text = "\n".join(page.extract_text() for page in PdfReader(str(pdf)).pages)
    assert "Atelectasis" in text
    assert not re.search(r"\bnan\b", text, re.IGNORECASE), text[:2000]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_csv_written_to_dev_stdout_goes_where_standard_output_goes(busi, tmp_path):
    """Followed as a link to the file a shell appended to, it was renamed over that file (its
    earlier lines lost, the summary line printed into the unlinked one); into a pipe it failed
    ("No such file or directory")."""
    db_url, labels, _, _ = busi
    medcli = Path(sys.executable).parent / "medcli"
    command = f"{medcli} audit --db {db_url} --labels {labels} --bootstrap 0 --csv /dev/stdout"
    log = tmp_path / "log.txt"
    log.write_text("an earlier line\n")
    appended = subprocess.run(f"{command} >> {log}", shell=True, capture_output=True, text=True, timeout=300)
    assert appended.returncode == 0, appended.stderr
    lines = log.read_text().splitlines()
    assert lines[0] == "an earlier line" and lines[1].startswith("scope,by,level,label,metric")
    assert re.fullmatch(r"audit \d+ stored; wrote CSV /dev/stdout", lines[-1]), lines[-1]
    piped = subprocess.run(f"{command} | cat", shell=True, capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.startswith("scope,by,level,label,metric")
    # through a link, a link to /dev/fd, spelt with two slashes or through this thread: the same stream
    (tmp_path / "out.csv").symlink_to("/dev/stdout")
    (tmp_path / "fd").symlink_to("/dev/fd")
    for named in (tmp_path / "out.csv", "//dev/stdout", tmp_path / "fd" / "1", "/proc/thread-self/fd/1"):
        log.write_text("an earlier line\n")
        other = command.replace("--csv /dev/stdout", f"--csv {named}")
        appended = subprocess.run(f"{other} >> {log}", shell=True, capture_output=True, text=True, timeout=300)
        assert appended.returncode == 0, appended.stderr
        lines = log.read_text().splitlines()
        assert lines[0] == "an earlier line" and lines[1].startswith("scope,by,level,label,metric"), named
        assert re.fullmatch(r"audit \d+ stored; wrote CSV .*", lines[-1]), lines[-1]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_an_output_named_by_a_loop_of_links_cannot_be_written_and_says_so(busi, tmp_path):
    """Path.resolve raised RuntimeError ("Symlink loop"): a traceback, exit 1."""
    db_url, labels, _, _ = busi
    (tmp_path / "a.csv").symlink_to(tmp_path / "b.csv")
    (tmp_path / "b.csv").symlink_to(tmp_path / "a.csv")
    result = CliRunner().invoke(
        cli, ["audit", "--db", db_url, "--labels", str(labels), "--bootstrap", "0", "--csv", str(tmp_path / "a.csv")]
    )
    assert result.exit_code == 1 and f"--csv {tmp_path / 'a.csv'} cannot be written" in result.stderr, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
