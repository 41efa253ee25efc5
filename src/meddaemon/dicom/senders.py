"""Delivering one object to one destination: C-STORE (pynetdicom), STOW-RS (dicomweb-client), or a
folder. Each answers with a ``Delivery``: acknowledged, or failed with what the peer said and
whether trying again can help (a refusal for good goes ``dead`` at once)."""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit, urlunsplit
from xml.etree import ElementTree

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from meddaemon.config import DestinationConfig
from meddaemon.dicom import associations
from meddaemon.dicom.uids import uid_like
from meddaemon.files import fsync_dir, write_atomically

log = logging.getLogger("meddaemon.dicom.senders")
# pynetdicom logs every association at INFO and dumps whole PDUs at DEBUG; the outbox logs what matters
for _noisy in ("pynetdicom", "dicomweb_client"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)


class _ConnectFailures(logging.Filter):
    """pynetdicom says why it could not connect only in two ERROR lines of its log, at every retry
    against a peer that is down (log alerting took them for faults): kept here, by the thread that
    tried (the association's DUL thread), for the sender's answer, and not logged."""

    PREFIX = "TCP Initialisation Error: "

    def __init__(self) -> None:
        super().__init__()
        self.why: dict[int | None, str] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.PREFIX):
            if len(self.why) > 64:  # tries no sender asked about (a C-ECHO of the health check)
                self.why.clear()
            self.why[record.thread] = message.removeprefix(self.PREFIX)
            return False
        return message != "Association request failed: unable to connect to remote"

    def pop(self, assoc: Any) -> str | None:
        dul = getattr(assoc, "dul", None)
        return self.why.pop(getattr(dul, "ident", None), None)


_CONNECT_FAILURES = _ConnectFailures()
logging.getLogger("pynetdicom.transport").addFilter(_CONNECT_FAILURES)


@dataclass(frozen=True)
class Delivery:
    acknowledged: bool
    #: the peer's answer: a status code and its meaning, an HTTP status, an error
    detail: str = ""
    permanent: bool = False


#: the answer for an object not sent because the sender was asked to stop first: no attempt counted
NOT_SENT = Delivery(False, "not sent: the sender stopped first")


def never() -> bool:
    return False


def not_told(path: Path, answer: Delivery) -> None:
    pass


#: told of each object the peer acknowledged, the moment it did, before the next one is sent
Acknowledged = Callable[[Path, Delivery], None]


class Sender(Protocol):
    def send(
        self, objects: Sequence[Path], should_stop: Callable[[], bool] = never, acknowledged: Acknowledged = not_told
    ) -> list[Delivery]:
        """Deliver each file; one answer per file, in order (``NOT_SENT`` for those left once
        ``should_stop`` says so: its daemon is gone, and its successor sends them). Never raises.
        ``acknowledged`` hears of each object stored as soon as the peer says so: recorded then,
        an object is never sent again by the successor of a daemon killed in the middle of a send."""
        ...

    def release_idle(self) -> None:
        """Let go of a connection unused for the destination's ``keep_open_seconds``."""
        ...

    def close(self) -> None: ...


# -- C-STORE ---------------------------------------------------------------------------------------

#: C-STORE statuses that mean stored besides success and the Bxxx warnings (PS3.7 C.1: a warning is
#: 0001 or Bxxx; PS3.4 B.2.3 adds attribute list errors and values out of range)
STORED_WARNINGS = {0x0001, 0x0107, 0x0116}


def is_stored(status: int) -> bool:
    """The peer stored the object: success, or one of the warnings."""
    return status == 0x0000 or status in STORED_WARNINGS or 0xB000 <= status <= 0xBFFF


#: refusals no retry can change: SOP class not supported, not authorised, data set does not match
#: the SOP class (0xA9xx); the others (0xA7xx out of resources, 0xCxxx cannot understand, 0x0110
#: processing failure) may pass later
REFUSED_FOR_GOOD = {0x0122, 0x0124}
#: nothing came back from the peer: the first answer of a send on a kept association that makes
#: the sender try that send once more on a new one
DROPPED = Delivery(False, "the association was dropped")
NO_ANSWER = Delivery(False, "no C-STORE response (timeout, or the association was dropped)")


def dimse_status_is_permanent(status: int) -> bool:
    return status in REFUSED_FOR_GOOD or 0xA900 <= status <= 0xA9FF


def cannot_read(exc: Exception) -> Delivery:
    """An object file gone or damaged on disk: refused for good, and only that file (the outbox
    sends several objects a call; the others of the call go on)."""
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
    return Delivery(False, f"the object file cannot be read ({why})", True)


#: what reading a damaged object file raises: pydicom's refusal, or the parser running off its end
UNREADABLE_OBJECT = (OSError, InvalidDicomError, EOFError, ValueError, KeyError, struct.error)


def read_object(path: Path, stop_before_pixels: bool = False) -> Dataset:
    """The object's data set; ``InvalidDicomError`` for one without the UIDs that file it (pydicom
    reads a file cut short inside its File Meta as an empty data set), or with one that is not a UID
    (a folder destination makes folders of them)."""
    ds = dcmread(path, stop_before_pixels=stop_before_pixels)
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        if keyword not in ds:
            raise InvalidDicomError(f"it has no {keyword}")
        if not uid_like(ds[keyword].value):
            raise InvalidDicomError(f"its {keyword} is not a UID")
    return ds


@dataclass(frozen=True)
class _ObjectFile:
    """An object to send, known by its File Meta (the data set is not read)."""

    path: Path
    sop_class: str
    transfer_syntax: str

    def contexts(self) -> set[tuple[str, str]]:
        """The presentation contexts (SOP class, transfer syntax) to propose for it: its own syntax,
        and the two every peer takes (what it is converted to when the peer refuses its own)."""
        return {
            (self.sop_class, syntax)
            for syntax in (self.transfer_syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        }

    @classmethod
    def read(cls, path: Path) -> _ObjectFile | Delivery:
        """Its File Meta, or the refusal of a file that cannot be read."""
        try:
            meta = read_file_meta_info(path)
            if "MediaStorageSOPClassUID" not in meta or "TransferSyntaxUID" not in meta:
                raise InvalidDicomError("its File Meta has no SOP class or transfer syntax")
            return cls(path, str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
        except UNREADABLE_OBJECT as exc:
            return cannot_read(exc)


class DimseSender:
    """C-STORE over one association kept open between calls while objects keep coming.

    Opening an association costs a round of A-ASSOCIATE messages and pynetdicom's threads: 18 ms
    for a call of one object to Orthanc against 6 ms an object in a call of 64. The outbox sends a
    few objects a round, so the association stays open, with the presentation contexts of every
    object sent so far (``_ObjectFile.contexts``), and is released after ``keep_open_seconds``
    without a send (``release_idle``), at ``close``, or to add a context it lacks; between
    sends it rests (``associations.rest``: pynetdicom's threads stop polling). A peer may
    close an idle association at any moment (Orthanc after 30 s): when a kept association is gone
    before the first object of a send is answered, the send goes once more on a new one before
    anything counts as failed.
    """

    def __init__(self, destination: DestinationConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.destination = destination
        self.clock = clock
        #: the presentation contexts proposed so far: (SOP class, transfer syntax)
        self.contexts: set[tuple[str, str]] = set()
        self.ae: Any = None
        self.assoc: Any = None
        self.last_used = 0.0

    def send(
        self, objects: Sequence[Path], should_stop: Callable[[], bool] = never, acknowledged: Acknowledged = not_told
    ) -> list[Delivery]:
        read = [_ObjectFile.read(path) for path in objects]
        files = [f for f in read if isinstance(f, _ObjectFile)]
        sent = iter(self._send(files, should_stop, acknowledged) if files else [])
        return [next(sent) if isinstance(f, _ObjectFile) else f for f in read]

    def _send(
        self, files: list[_ObjectFile], should_stop: Callable[[], bool], acknowledged: Acknowledged
    ) -> list[Delivery]:
        contexts = set().union(*(f.contexts() for f in files))
        if self._kept_for(contexts):
            associations.wake(self.assoc)
            started = time.monotonic()
            answers = self._store(files, should_stop, acknowledged)
            # no answer as long as the timeout: the peer had the request and is slow, not gone (sent
            # again at once, a slow archive had each object twice); the backoff tries it again
            timed_out = answers[0] == NO_ANSWER and time.monotonic() - started >= 0.9 * self.destination.timeout_seconds
            if answers[0] not in (DROPPED, NO_ANSWER) or timed_out:  # (else nothing was stored, nor acknowledged)
                return self._done(answers)
            self._release()  # the peer let the kept association go before the first answer
        refusal = self._open(contexts)
        if refusal is not None:
            return [refusal] * len(files)
        return self._done(self._store(files, should_stop, acknowledged))

    def release_idle(self) -> None:
        if self.assoc is not None and self.clock() - self.last_used >= self.destination.keep_open_seconds:
            self._release()

    def close(self) -> None:
        self._release()

    def _kept_for(self, contexts: set[tuple[str, str]]) -> bool:
        """An association is open and proposed each of ``contexts``."""
        return self.assoc is not None and associations.ready(self.assoc) and contexts <= self.contexts

    def _open(self, contexts: set[tuple[str, str]]) -> Delivery | None:
        """A new association, proposing ``contexts`` and those proposed before; why it failed, or None.
        A peer that accepts none of the contexts refuses for good (pynetdicom then aborts the
        association it had accepted: taken for a failure to connect, it was retried for an hour)."""
        from pynetdicom import AE, _config

        _config.STORE_SEND_CHUNKED_DATASET = True  # for paths only: what ``_store`` sends as written
        self._release()
        d = self.destination
        self.contexts |= contexts
        self.ae = AE(ae_title=d.calling_ae_title)
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = d.timeout_seconds
        self.ae.connection_timeout = min(d.timeout_seconds, 10.0)
        for sop_class, syntax in sorted(self.contexts):  # a context a syntax: a peer then accepts each it can
            self.ae.add_requested_context(sop_class, syntax)
        self.assoc = self.ae.associate(d.host, d.port, ae_title=d.ae_title, evt_handlers=associations.handlers())
        if not self.assoc.is_established:
            where = f"({d.host}:{d.port} {d.ae_title})"
            if self.assoc.rejected_contexts and not self.assoc.accepted_contexts:
                refused = sorted({str(cx.abstract_syntax.name) for cx in self.assoc.rejected_contexts})
                self._release()
                return Delivery(
                    False, f"refused: the peer accepts no presentation context of {', '.join(refused)} {where}", True
                )
            cannot_connect = _CONNECT_FAILURES.pop(self.assoc)
            if cannot_connect is not None:
                why = f"no connection: {cannot_connect}"
            else:
                why = "association rejected" if self.assoc.is_rejected else "association aborted or no connection"
            self._release()
            return Delivery(False, f"{why} {where}")
        associations.prompt(self.assoc, timeout=d.timeout_seconds)
        associations.keep_answers(self.assoc)
        return None

    def _store(
        self, files: list[_ObjectFile], should_stop: Callable[[], bool], acknowledged: Acknowledged
    ) -> list[Delivery]:
        """Each file sent as it is written where the peer accepted its transfer syntax (pynetdicom
        reads it in chunks, ``STORE_SEND_CHUNKED_DATASET``); otherwise read, decompressed if it
        is compressed, and sent in the syntax the peer accepted. Reading and encoding every object
        again was a fifth of the sender's CPU."""
        as_written = {(str(c.abstract_syntax), str(c.transfer_syntax[0])) for c in self.assoc.accepted_contexts}
        answers: list[Delivery] = []
        for f in files:
            if should_stop():
                answers.append(NOT_SENT)
                continue
            if not self.assoc.is_established:
                answers.append(DROPPED)
                continue
            try:
                if (f.sop_class, f.transfer_syntax) in as_written:
                    status = self.assoc.send_c_store(f.path)
                else:
                    converted = _uncompressed(f.path)
                    if isinstance(converted, Delivery):
                        answers.append(converted)
                        continue
                    status = self.assoc.send_c_store(converted)
            except (OSError, InvalidDicomError, EOFError, struct.error) as exc:
                answers.append(cannot_read(exc))
                continue
            except (ValueError, RuntimeError) as exc:
                if not self.assoc.is_established:  # dropped between the check and the request
                    answers.append(DROPPED)
                else:  # no accepted presentation context for its SOP class
                    answers.append(Delivery(False, f"refused: {exc}", True))
                continue
            except Exception as exc:  # pynetdicom's or a decoder's own failure: this object only, retried
                log.exception("sending %s failed", f.path.name)
                answers.append(Delivery(False, f"{type(exc).__name__} while sending"))
                continue
            answers.append(_dimse_answer(status))
            if answers[-1].acknowledged:
                acknowledged(f.path, answers[-1])
        return answers

    def _done(self, answers: list[Delivery]) -> list[Delivery]:
        self.last_used = self.clock()
        if self.destination.keep_open_seconds <= 0 or not associations.ready(self.assoc):
            self._release()
        else:
            associations.rest(self.assoc)
        return answers

    def _release(self) -> None:
        assoc, ae, self.assoc, self.ae = self.assoc, self.ae, None, None
        if assoc is not None:
            associations.wake(assoc)
            if associations.ready(assoc):
                assoc.release()
            elif assoc.is_established:  # the peer left while it rested: what is left of it goes
                assoc.abort()
        if ae is not None:
            ae.shutdown()


def _uncompressed(path: Path) -> Dataset | Delivery:
    """The object at ``path`` read, its pixel data decompressed if it was compressed (a Secondary
    Capture's JPEG, for a peer that accepts only uncompressed syntaxes); a refusal for good when it
    cannot be (no decoder here, or a decoder's error: trying again will not help, and the other
    objects of the send go on). Decompressed, it keeps its SOP Instance UID."""
    ds = dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        try:
            # the same instance in another transfer syntax: pydicom would give it a new SOP Instance
            # UID, and every resend of a capture was one more image in the patient's study
            ds.decompress(generate_instance_uid=False)
        except Exception as exc:  # whichever decoder pydicom picked, however it fails
            why = f"{type(exc).__name__}: {exc}"
            return Delivery(
                False, f"the peer refused the object's transfer syntax; decompressing it failed ({why})", True
            )
    return ds


def _dimse_answer(status: Dataset) -> Delivery:
    if "Status" not in status:
        return NO_ANSWER
    code = int(status.Status)
    text = f"C-STORE status 0x{code:04X}"
    comment = status.get("ErrorComment")
    if comment:
        text += f" ({comment})"
    if is_stored(code):
        return Delivery(True, "" if code == 0 else text)
    return Delivery(False, text, dimse_status_is_permanent(code))


# -- STOW-RS ---------------------------------------------------------------------------------------

#: HTTP statuses worth trying again: 408 timeout, 409 conflict (STOW-RS: instances not stored),
#: 429 too many requests, and every 5xx
RETRYABLE_HTTP = {408, 409, 429}


#: STOW-RS failure reasons no retry can change (PS3.18 10.5.3): those of C-STORE, and 0xC122 the
#: transfer syntax not supported
STOW_REFUSED_FOR_GOOD = {0xC122}


def _refused_for_good(reasons: list[int]) -> bool:
    """Every instance's failure reason (one here: an object a request) is a refusal for good."""
    return bool(reasons) and all(dimse_status_is_permanent(r) or r in STOW_REFUSED_FOR_GOOD for r in reasons)


def _failed_sops(response: Any) -> list[int] | None:
    """The Failure Reasons (0008,1197) of the Failed SOP Sequence (0008,1198) in a STOW-RS answer (a
    409's body, or a success status's), DICOM JSON or XML whatever its media type's parameters
    (dicomweb-client reads a body whose type is exactly theirs); None where it names no failed SOP."""
    media_type = _media_type(response)
    try:
        if media_type in ("application/dicom+json", "application/json"):
            items = response.json()["00081198"]["Value"]
            reasons = [int(item["00081197"]["Value"][0]) for item in items if "00081197" in item]
        elif media_type in ("application/dicom+xml", "application/xml"):
            # the Native DICOM Model, with its namespace or without
            failed = ElementTree.fromstring(response.content).find("{*}DicomAttribute[@tag='00081198']")
            items = failed.findall("{*}Item") if failed is not None else []
            found = (item.find("{*}DicomAttribute[@tag='00081197']/{*}Value") for item in items)
            reasons = [int(value.text or "") for value in found if value is not None]
        else:
            return None
    except (AttributeError, ValueError, KeyError, IndexError, TypeError, ElementTree.ParseError):
        return None
    return reasons if items else None


def _media_type(response: Any) -> str:
    """An HTTP answer's media type, without its parameters (``text/html``)."""
    return str(response.headers.get("Content-Type", "")).split(";")[0].strip().lower()


def _failed_sop(reasons: list[int]) -> Delivery:
    """A STOW-RS answer naming the object in its Failed SOP Sequence, for ``reasons``."""
    detail = "STOW-RS failed SOP" + "".join(f", failure reason 0x{r:04X}" for r in reasons)
    return Delivery(False, detail, _refused_for_good(reasons))


def _base_and_query(url: str) -> tuple[str, dict[str, list[str]]]:
    """A DICOMweb URL without its query and fragment, and its query's parameters (a token, say),
    which go with every request: each key with all its values, in order (``requests`` merges a
    session's parameters given as a dict only)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query="", fragment="")), parse_qs(parts.query, keep_blank_values=True)


def trusting_adapter(ca_file: str) -> Any:
    """An HTTPS adapter (made on first use: requests is imported late) that checks certificates
    against ``ca_file`` whatever the environment says:
    ``session.verify`` loses to ``REQUESTS_CA_BUNDLE`` (requests merges the environment's bundle
    into each request), and a host that sets it for all its programs ignored the destination's CA."""
    from requests.adapters import HTTPAdapter

    class TrustingAdapter(HTTPAdapter):
        def send(self, request: Any, **kwargs: Any) -> Any:
            kwargs["verify"] = ca_file
            return super().send(request, **kwargs)

    return TrustingAdapter()


class StowSender:
    def __init__(self, destination: DestinationConfig) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        self.destination = destination
        #: the HTTP status of the last answer heard, whether dicomweb-client could read its body or not
        self.heard: int | None = None
        #: that answer's media type (``text/html``), without its parameters
        self.heard_type = ""
        #: the Failure Reasons of a Failed SOP Sequence in that answer (None: no such sequence), read
        #: here: dicomweb-client reads a body whose media type is exactly application/dicom+json (or
        #: +xml), and took ``application/dicom+json; charset=utf-8`` for no failure
        self.heard_failed: list[int] | None = None
        base_url, query = _base_and_query(destination.url)
        session = requests.Session()
        session.params = query  # dicomweb-client appends its resource to the URL it is given, query and all
        # a 301/302/303 is followed by a GET without the instance, whose 200 read as the POST's success
        session.max_redirects = 0
        if destination.ca_file:  # a hospital's own CA: its servers' certificates failed as "SSLError"
            session.mount("https://", trusting_adapter(destination.ca_file))
        self.client = DICOMwebClient(
            url=base_url, session=session, timeout=destination.timeout_seconds, callback=self._heard
        )
        self.client.set_http_retry_params(retry=False)  # the outbox retries, with its own backoff

    def _transport_reason(self, exc: Exception) -> str:
        """Why no answer came, in words: requests' own message names the URL with its query, which
        may hold a token; a mistyped host and a server down both read "ConnectionError"."""
        import requests

        timeout = self.destination.timeout_seconds
        if isinstance(exc, requests.exceptions.ConnectTimeout):
            return f"no connection within {timeout:g} s"
        if isinstance(exc, requests.exceptions.Timeout):
            return f"no answer within {timeout:g} s"
        cause = exc.args[0] if exc.args else None
        root = getattr(cause, "reason", cause)
        text = f"{type(root).__name__}: {root}"
        if isinstance(exc, requests.exceptions.SSLError):
            if "mismatch" in text or "doesn't match" in text:
                return "its TLS certificate is for another host name than the URL's"
            if "CERTIFICATE_VERIFY_FAILED" in text and self.destination.ca_file:
                return f"its TLS certificate is not signed by the destination's ca_file ({self.destination.ca_file})"
            if "CERTIFICATE_VERIFY_FAILED" in text:
                return "its TLS certificate is not trusted (a hospital's own CA: give it as the destination's ca_file)"
            return "the TLS handshake failed"
        if "NameResolution" in text or "Name or service not known" in text or "Failed to resolve" in text:
            return f"its host name does not resolve ({urlsplit(self.destination.url).hostname})"
        if "Connection refused" in text or "ConnectionRefused" in text:
            return "the connection was refused (nothing listens there)"
        if "Connection reset" in text or "RemoteDisconnected" in text or "closed connection" in text:
            return "the server closed the connection without an answer"
        return "no connection"

    def _heard(self, response: Any, *args: Any, **kwargs: Any) -> None:
        self.heard = response.status_code
        self.heard_type = _media_type(response)
        self.heard_failed = _failed_sops(response)

    def send(
        self, objects: Sequence[Path], should_stop: Callable[[], bool] = never, acknowledged: Acknowledged = not_told
    ) -> list[Delivery]:
        import requests

        answers: list[Delivery] = []
        unreachable: Delivery | None = None
        for path in objects:
            if should_stop():
                answers.append(NOT_SENT)
                continue
            if unreachable is not None:  # each would wait the timeout again, and every destination behind it
                answers.append(unreachable)
                continue
            try:
                ds = read_object(path)
            except UNREADABLE_OBJECT as exc:
                answers.append(cannot_read(exc))
                continue
            self.heard, self.heard_failed = None, None
            try:
                self.client.store_instances(datasets=[ds])
            except requests.exceptions.HTTPError as exc:
                code = exc.response.status_code if exc.response is not None else 0
                reasons = _failed_sops(exc.response) or []
                permanent = (code < 500 and code not in RETRYABLE_HTTP) or _refused_for_good(reasons)
                detail = f"STOW-RS HTTP {code}" + "".join(f", failure reason 0x{r:04X}" for r in reasons)
                answers.append(Delivery(False, detail, permanent and code != 0))
            except requests.exceptions.TooManyRedirects:
                detail = (
                    f"STOW-RS HTTP {self.heard}, a redirect: not followed (the destination's url must be the server's)"
                )
                answers.append(Delivery(False, detail))
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
                answers.append(Delivery(False, f"STOW-RS {type(exc).__name__}: {self._transport_reason(exc)}"))
                unreachable = Delivery(False, f"{answers[-1].detail} (not tried: the one before it had no answer)")
            except requests.exceptions.RequestException as exc:
                answers.append(Delivery(False, f"STOW-RS {type(exc).__name__}"))
            except Exception as exc:  # dicomweb-client could not read the answer's body, or failed itself
                refused = self.heard_failed is not None  # read here all the same
                answers.append(_failed_sop(self.heard_failed or []) if refused else self._unreadable_answer(exc))
            else:
                if self.heard_failed is not None:
                    answers.append(_failed_sop(self.heard_failed))
                elif self.heard_type == "text/html":  # no DICOMweb server answers so: a proxy's login page, say
                    answers.append(Delivery(False, f"STOW-RS HTTP {self.heard} with a web page, not a STOW-RS answer"))
                else:
                    answers.append(Delivery(True))
            if answers[-1].acknowledged:
                acknowledged(path, answers[-1])
        return answers

    def _unreadable_answer(self, exc: Exception) -> Delivery:
        """A success status whose body dicomweb-client could not read (not DICOM JSON, no content
        type) still says the instance was stored: sent again it would be stored twice."""
        why = f"{type(exc).__name__}: {exc}"
        if self.heard is not None and 200 <= self.heard < 300:
            return Delivery(True, f"STOW-RS HTTP {self.heard}, an answer that could not be read ({why})"[:500])
        log.warning("sending over STOW-RS failed: %s", why)
        return Delivery(False, f"STOW-RS {type(exc).__name__}" + (f" after HTTP {self.heard}" if self.heard else ""))

    def release_idle(self) -> None:
        pass  # requests keeps its connections, and the server closes those it no longer wants

    def close(self) -> None:
        session = getattr(self.client, "_session", None)
        if session is not None:
            session.close()


# -- a folder --------------------------------------------------------------------------------------


class FolderSender:
    """``<path>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, written whole; a
    resend replaces the same file. Acknowledged once the file and its folder are fsynced: a folder
    fsync the disk fails (EIO) is a failed delivery, sent again later. ``path`` itself must exist:
    the mount point of a share that is not mounted is not the share (its objects, written on the
    local disk, would have been acknowledged and never reached it)."""

    def __init__(self, destination: DestinationConfig) -> None:
        self.root = Path(destination.path)

    def send(
        self, objects: Sequence[Path], should_stop: Callable[[], bool] = never, acknowledged: Acknowledged = not_told
    ) -> list[Delivery]:
        if not self.root.is_dir():
            missing = Delivery(False, f"the destination folder {self.root} does not exist (is its share mounted?)")
            return [missing] * len(objects)
        answers = []
        for path in objects:
            if should_stop():
                answers.append(NOT_SENT)
                continue
            try:
                data = path.read_bytes()
                ds = read_object(path, stop_before_pixels=True)
                target = self.root / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
            except UNREADABLE_OBJECT as exc:
                answers.append(cannot_read(exc))
                continue
            try:
                write_atomically(target, data, durable=True, sync_folder=False)
                fsync_dir(target.parent, strict=True)
            except OSError as exc:
                answers.append(Delivery(False, f"{type(exc).__name__}: {exc.strerror or exc}"))
            else:
                answers.append(Delivery(True))
                acknowledged(path, answers[-1])
        return answers

    def release_idle(self) -> None:
        pass

    def close(self) -> None:
        pass


def make_sender(destination: DestinationConfig) -> Sender:
    if destination.kind == "dicom":
        return DimseSender(destination)
    if destination.kind == "dicomweb":
        return StowSender(destination)
    return FolderSender(destination)
