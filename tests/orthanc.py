"""Orthanc, a real PACS (Debian packages ``orthanc`` and ``orthanc-dicomweb``), for the tests: started
on loopback with free ports, storage under the test's tmp_path, as a DICOM node (C-STORE SCP) and
a DICOMweb server (STOW-RS, QIDO, WADO); stopped and started again on the same ports and storage
to play a PACS that goes away; read back through its REST API, and told through it to send what it
holds to a DICOM node (C-STORE SCU).

``orthanc`` is a fixture; ``Orthanc`` can also be used directly (several in one test).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ports import free_port

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
AE_TITLE = "ORTHANC"


def require_orthanc() -> None:
    """Skip (outside CI) or fail (in CI) when Orthanc or its DICOMweb plugin is not installed."""
    binary = ORTHANC if ORTHANC.exists() else shutil.which("Orthanc")
    if binary is None or not DICOMWEB_PLUGIN.exists():
        message = "Orthanc and its DICOMweb plugin (Debian orthanc, orthanc-dicomweb) are not installed"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; scripts/system-packages.sh installs them")
        pytest.skip(message)


class Orthanc:
    def __init__(self, root: Path, ae_title: str = AE_TITLE) -> None:
        self.root = root
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "orthanc.json"
        self.log = root / "orthanc.log"
        self.config.write_text(
            json.dumps(
                {
                    "Name": "meddaemon-test",
                    "DicomAet": ae_title,
                    "DicomPort": self.dicom_port,
                    "HttpPort": self.http_port,
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False,
                    "DicomCheckCalledAet": False,
                    "DicomAlwaysAllowStore": True,
                    "StorageDirectory": str(root / "storage"),
                    "IndexDirectory": str(root / "index"),
                    "Plugins": [str(DICOMWEB_PLUGIN)],
                    "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                    "HttpsVerifyPeers": False,
                    "ConcurrentJobs": 1,
                    "StableAge": 1,
                }
            )
        )

    def add_modality(self, name: str, ae_title: str, port: int, host: str = "127.0.0.1") -> None:
        """A DICOM node Orthanc may send to (``store``); before ``start``."""
        config = json.loads(self.config.read_text())
        config.setdefault("DicomModalities", {})[name] = [ae_title, host, port]
        self.config.write_text(json.dumps(config))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def destination(self, name: str, kind: str) -> dict[str, Any]:
        """A ``[[destination]]`` table for this Orthanc: ``dicom`` (C-STORE) or ``dicomweb`` (STOW-RS)."""
        if kind == "dicom":
            return {
                "name": name,
                "kind": "dicom",
                "ae_title": self.ae_title,
                "host": "127.0.0.1",
                "port": self.dicom_port,
            }
        return {"name": name, "kind": "dicomweb", "url": self.dicomweb_url}

    def start(self, timeout: float = 30.0) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(ORTHANC if ORTHANC.exists() else "Orthanc"), str(self.config)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                self.get("/system")
                if self._accepts_dicom():
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        self.stop()  # not left running, holding its ports, for the tests after this one
        raise RuntimeError(f"Orthanc did not start within {timeout} s:\n{self.log_tail()}")

    def _accepts_dicom(self) -> bool:
        with socket.socket() as s:
            s.settimeout(1.0)
            return s.connect_ex(("127.0.0.1", self.dicom_port)) == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def discard(self) -> None:
        """End a server whose storage is thrown away with the test: killed, not stopped in order,
        which takes Orthanc 3.5 s even idle (its HTTP and DICOM servers wind down in turn)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text("utf-8", "replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    # -- the REST API ----------------------------------------------------------------------------

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as response:
            return json.loads(response.read())

    def instances(self) -> list[str]:
        """Orthanc's ids of every instance it stores."""
        return list(self.get("/instances"))

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        return dict(self.get(f"/instances/{orthanc_id}/simplified-tags"))

    def sop_instance_uids(self) -> list[str]:
        """The SOP Instance UID of every instance it stores (one request, however many)."""
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in self.get("/instances?expand")]

    def study_series(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Each series of the study: its MainDicomTags, its instances' SOP Class UIDs (``sop_classes``)."""
        found = self._post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_instance_uid}})
        out = []
        for study in found:
            for series in self.get(f"/studies/{study}/series"):
                classes = [self.instance_tags(i)["SOPClassUID"] for i in series["Instances"]]
                out.append({**series["MainDicomTags"], "sop_classes": classes, "instances": len(classes)})
        return out

    def upload(self, path: Path) -> dict[str, Any]:
        """Store a DICOM file in Orthanc as a modality would have (its REST API, ``POST /instances``)."""
        return dict(self._post("/instances", path.read_bytes(), "application/dicom"))

    def store(self, modality: str, resources: list[str], timeout: float = 60) -> dict[str, Any]:
        """Have Orthanc send studies, series or instances (its ids) to a modality by C-STORE."""
        return dict(
            self._post(f"/modalities/{modality}/store", {"Resources": resources, "Synchronous": True}, timeout=timeout)
        )

    def _post(
        self, path: str, body: dict[str, Any] | bytes, content_type: str = "application/json", timeout: float = 10
    ) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data, headers={"Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A running Orthanc on loopback, storage under tmp_path; discarded at the end."""
    require_orthanc()
    server = Orthanc(tmp_path / "orthanc")
    server.start()
    try:
        yield server
    finally:
        server.discard()
