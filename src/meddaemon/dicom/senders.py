"""Delivering one object to one destination: C-STORE (pynetdicom), STOW-RS (dicomweb-client), or a
folder. Each answers with a ``Delivery``: acknowledged, or failed with what the peer said and
whether trying again can help (a refusal for good goes ``dead`` at once)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from meddaemon.config import DestinationConfig
from meddaemon.dicom import associations
from meddaemon.files import write_atomically

log = logging.getLogger("meddaemon.dicom.senders")
# pynetdicom logs every association at INFO and dumps whole PDUs at DEBUG; the outbox logs what matters
for _noisy in ("pynetdicom", "dicomweb_client"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)


@dataclass(frozen=True)
class Delivery:
    acknowledged: bool
    #: the peer's answer: a status code and its meaning, an HTTP status, an error
    detail: str = ""
    permanent: bool = False


class Sender(Protocol):
    def send(self, objects: Sequence[Path]) -> list[Delivery]:
        """Deliver each file; one answer per file, in order. Never raises for a peer's failure."""
        ...

    def close(self) -> None: ...


# -- C-STORE ---------------------------------------------------------------------------------------

#: C-STORE statuses that mean stored (PS3.4 B.2.3): success and the warnings
STORED = {0x0000, 0xB000, 0xB006, 0xB007, 0x0107, 0x0116}
#: refusals no retry can change: SOP class not supported, not authorised, data set does not match
#: the SOP class (0xA9xx); the others (0xA7xx out of resources, 0xCxxx cannot understand, 0x0110
#: processing failure) may pass later
REFUSED_FOR_GOOD = {0x0122, 0x0124}


def dimse_status_is_permanent(status: int) -> bool:
    return status in REFUSED_FOR_GOOD or 0xA900 <= status <= 0xA9FF


class DimseSender:
    """One association per call, with a presentation context for each SOP class in it."""

    def __init__(self, destination: DestinationConfig) -> None:
        self.destination = destination

    def send(self, objects: Sequence[Path]) -> list[Delivery]:
        from pynetdicom import AE

        d = self.destination
        try:
            datasets = [dcmread(path) for path in objects]
        except OSError as exc:
            return [Delivery(False, f"the object file cannot be read ({exc.strerror or exc})", True)] * len(objects)
        ae = AE(ae_title=d.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = d.timeout_seconds
        ae.connection_timeout = min(d.timeout_seconds, 10.0)
        for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title, evt_handlers=associations.handlers())
        if not assoc.is_established:
            why = "association rejected" if assoc.is_rejected else "association aborted or no connection"
            return [Delivery(False, f"{why} ({d.host}:{d.port} {d.ae_title})")] * len(objects)
        associations.prompt(assoc)
        associations.keep_answers(assoc)
        answers: list[Delivery] = []
        try:
            for ds in datasets:
                if not assoc.is_established:
                    answers.append(Delivery(False, "the association was dropped"))
                    continue
                try:
                    status = assoc.send_c_store(ds)
                except (ValueError, RuntimeError) as exc:  # no accepted presentation context
                    answers.append(Delivery(False, f"refused: {exc}", True))
                    continue
                answers.append(_dimse_answer(status))
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()
        return answers

    def close(self) -> None:
        pass


def _dimse_answer(status: Dataset) -> Delivery:
    if "Status" not in status:
        return Delivery(False, "no C-STORE response (timeout, or the association was dropped)")
    code = int(status.Status)
    text = f"C-STORE status 0x{code:04X}"
    comment = status.get("ErrorComment")
    if comment:
        text += f" ({comment})"
    if code in STORED:
        return Delivery(True, "" if code == 0 else text)
    return Delivery(False, text, dimse_status_is_permanent(code))


# -- STOW-RS ---------------------------------------------------------------------------------------

#: HTTP statuses worth trying again: 408 timeout, 409 conflict (STOW-RS: instances not stored),
#: 429 too many requests, and every 5xx
RETRYABLE_HTTP = {408, 409, 429}


class StowSender:
    def __init__(self, destination: DestinationConfig) -> None:
        from dicomweb_client.api import DICOMwebClient

        self.destination = destination
        self.client = DICOMwebClient(url=destination.url, timeout=destination.timeout_seconds)
        self.client.set_http_retry_params(retry=False)  # the outbox retries, with its own backoff

    def send(self, objects: Sequence[Path]) -> list[Delivery]:
        import requests

        answers: list[Delivery] = []
        for path in objects:
            try:
                ds = dcmread(path)
            except OSError as exc:
                answers.append(Delivery(False, f"the object file cannot be read ({exc.strerror or exc})", True))
                continue
            try:
                answer = self.client.store_instances(datasets=[ds])
            except requests.exceptions.HTTPError as exc:
                code = exc.response.status_code if exc.response is not None else 0
                permanent = code < 500 and code not in RETRYABLE_HTTP
                answers.append(Delivery(False, f"STOW-RS HTTP {code}", permanent and code != 0))
            except requests.exceptions.RequestException as exc:
                answers.append(Delivery(False, f"STOW-RS {type(exc).__name__}"))
            else:
                failed = answer.get("FailedSOPSequence") if answer is not None else None
                if failed:
                    reason = failed[0].get("FailureReason")
                    answers.append(Delivery(False, f"STOW-RS failed SOP, reason {reason}"))
                else:
                    answers.append(Delivery(True))
        return answers

    def close(self) -> None:
        session = getattr(self.client, "_session", None)
        if session is not None:
            session.close()


# -- a folder --------------------------------------------------------------------------------------


class FolderSender:
    """``<path>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, written whole; a
    resend replaces the same file."""

    def __init__(self, destination: DestinationConfig) -> None:
        self.root = Path(destination.path)

    def send(self, objects: Sequence[Path]) -> list[Delivery]:
        answers = []
        for path in objects:
            try:
                data = path.read_bytes()
                ds = dcmread(path, stop_before_pixels=True)
                target = self.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
                write_atomically(target, data, durable=True)
            except OSError as exc:
                answers.append(Delivery(False, f"{type(exc).__name__}: {exc.strerror or exc}"))
            else:
                answers.append(Delivery(True))
        return answers

    def close(self) -> None:
        pass


def make_sender(destination: DestinationConfig) -> Sender:
    if destination.kind == "dicom":
        return DimseSender(destination)
    if destination.kind == "dicomweb":
        return StowSender(destination)
    return FolderSender(destination)
