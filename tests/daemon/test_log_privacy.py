"""No header value reaches the daemon's log from any of its processes. pydicom's and highdicom's
warnings and log lines quote element values, a patient's name among them; the report process,
which builds the reports and the DICOM outputs, let them through to the journal."""

from __future__ import annotations

from pathlib import Path

from dicom_factory import write_dicom

from daemon_harness import Daemons, wait_until
from model_factory import promote_into, write_model

#: a name of one component: highdicom warns about it, quoting it
PATIENT_NAME = "SYNTHETICPHINAME QQ"


def test_a_name_highdicom_warns_about_reaches_no_log_line_of_the_report_process(daemons: Daemons, tmp_path: Path):
    layout = daemons.layout
    promote_into(f"sqlite:///{layout.db}", layout.state / "models", write_model(tmp_path / "model"))
    share = layout.root / "share"
    share.mkdir()
    config = layout.root / "meddaemon.toml"
    config.write_text(f'[[destination]]\nname = "share"\nkind = "folder"\npath = "{share}"\n', "utf-8")
    write_dicom(layout.inbox / "scan.dcm", modality="US", body_part="BREAST", patient_name=PATIENT_NAME)

    daemon = daemons.start(extra=("--config", str(config)))
    wait_until(lambda: len(list(share.rglob("*.dcm"))) >= 4, timeout=120, what="the DICOM outputs", daemon=daemon)
    daemon.signal(15)
    assert daemon.wait(60) == 0, daemon.tail()
    log = daemon.log_text()
    assert "serving busi/v1" in log  # the log is the daemon's, and whole
    assert "SYNTHETICPHINAME" not in log, [line for line in log.splitlines() if "SYNTHETICPHINAME" in line]
