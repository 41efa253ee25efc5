"""A stored audit in the console: the tables and the CSV are ``medcli audit``'s own, every subgroup
level kept, and the confusion counts of every kind of task shown. The predictions and the truth are
SYNTHETIC (``audit_factory``)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from audit_factory import synthetic_cohort
from meddaemon.cli.medcli import cli as medcli
from meddaemon.web.app import create_app
from web_factory import signed_in, web_settings


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_stored_audit_s_page_and_csv_are_the_cli_s_with_every_subgroup_and_each_label_s_confusion(
    migrated_engine, db_url: str, tmp_path: Path
):
    """The console left out a subgroup level too small to judge (its page and its CSV: 66 rows of
    the 79 `medcli audit --csv` wrote), wrote other columns, and showed no confusion counts for a
    binary or multilabel task."""
    cohort = synthetic_cohort(migrated_engine, "covid", 150, seed=2)
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "site"])
        for i, name in enumerate(cohort.names):
            writer.writerow([name.split("/")[-1], cohort.labels[int(cohort.truth[i, 1])], "tiny" if i < 10 else "main"])
    written = tmp_path / "cli.csv"
    result = CliRunner().invoke(
        medcli, ["audit", "--db", db_url, "--labels", str(labels), "--by", "site", "--csv", str(written), "--json"]
    )
    assert result.exit_code == 0, result.output
    stored = json.loads(result.stdout)
    client = signed_in(create_app(web_settings(tmp_path, db=db_url)), "viewer")

    served = client.get(f"/audits/{stored['audit_id']}.csv")
    assert served.status_code == 200 and served.content == written.read_bytes()
    tiny = [row for row in csv.DictReader(served.text.splitlines()) if row["level"] == "tiny"]
    assert tiny and all(row["value"] == "" and row["undefined_reason"] for row in tiny)

    page = client.get(f"/audits/{stored['audit_id']}").text
    assert "<td>tiny</td>" in page.split('id="subgroups"', 1)[1].split("</table>", 1)[0]
    confusion = page.split('id="confusion"', 1)[1].split("</table>", 1)[0]
    [covid] = [m for m in stored["labels"] if m["label"] == "covid"]
    counts = covid["confusion"]
    assert "".join(f'<td class="n">{counts[k]}</td>' for k in ("tp", "fp", "tn", "fn")) in confusion
