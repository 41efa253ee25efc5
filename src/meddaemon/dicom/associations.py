"""What meddaemon does to every pynetdicom association it opens or accepts: its TCP socket set up
for DICOM's request-and-answer exchange (``handlers``, ``prompt``), and, where it sends requests,
the answers kept for the requests that wait for them (``keep_answers``) and an association kept
open between sends at rest (``rest``, ``wake``, ``ready``).

DICOM peers built on dcmtk (storescu, storescp, Orthanc, most modalities) leave Nagle's algorithm
on and write a PDU in two sends, its 6-byte header first. Nagle holds the second send until the
first is acknowledged, and Linux delays that acknowledgement by 40 ms once a connection looks
interactive (this side answered soon after receiving, as DICOM always does): every C-STORE
response from Orthanc waited about 40 ms, 49 ms a C-STORE against 3 to 4 ms without it. Linux's
``TCP_QUICKACK`` acknowledges at once, but only until this side sends again, so it is set again
after each send (``EVT_DATA_SENT``). ``TCP_NODELAY`` keeps this side's own sends from waiting the
same way: pynetdicom writes a PDU in several small sends.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

#: Linux only; elsewhere acknowledgements keep the system's timing
TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def raw_socket(assoc: Any) -> socket.socket | None:
    """The association's TCP socket (None: not connected)."""
    return getattr(getattr(assoc.dul, "socket", None), "socket", None)


def _acknowledge_at_once(event: Any) -> None:
    raw = raw_socket(event.assoc)
    if raw is not None and TCP_QUICKACK is not None:
        with contextlib.suppress(OSError):
            raw.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)


def handlers() -> list[tuple[Any, Any]]:
    """pynetdicom's event handlers for ``AE.associate`` and ``AE.start_server``, with ``prompt`` once
    established (pynetdicom is imported here, not with this module: a daemon without DICOM never needs it)."""
    from pynetdicom import evt

    return [(evt.EVT_DATA_SENT, _acknowledge_at_once)]


def prompt(assoc: Any, timeout: float | None = None) -> None:
    """``TCP_NODELAY`` on an established association, and the peer's next segments acknowledged at
    once (``handlers`` keep it so after each send). ``timeout`` bounds each write to the socket,
    which pynetdicom makes blocking once connected: a peer that stopped reading (a frozen switch, no
    reset) held the write of a large object, and the sender with it, for good; timed out, the write
    closes the connection (pynetdicom's Evt17) and the send fails, to be tried again."""
    raw = raw_socket(assoc)
    if raw is None:
        return
    with contextlib.suppress(OSError):
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if TCP_QUICKACK is not None:
            raw.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
    if timeout is not None:
        with contextlib.suppress(OSError):  # closed meanwhile by the peer: the send finds it dropped
            raw.settimeout(timeout)


def keep_answers(assoc: Any) -> None:
    """An answer the association's reactor thread takes while a ``send_c_*`` waits for it is put back
    for that send, not dropped.

    pynetdicom pauses the reactor thread while a ``send_c_*`` waits for its answer, but it checks only
    a flag the thread sets just before it waits: a thread already past the wait runs once more, and
    an answer quick enough to arrive meanwhile is taken by it and dropped ("Received unexpected
    C-STORE service message") while the send waits out its DIMSE timeout and aborts the association.
    Answers come that quickly from a peer on loopback that is acknowledged at once (``prompt``). A
    request from the peer, or an answer while no send waits (the checkpoint set), is served as
    before."""
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    serve = getattr(assoc, "_serve_request", None)
    if checkpoint is None or serve is None:
        return

    def serve_or_keep(msg: Any, context_id: int) -> None:
        if msg.is_valid_response and not checkpoint.is_set():
            assoc.dimse.msg_queue.put((context_id, msg))
        else:
            serve(msg, context_id)

    assoc._serve_request = serve_or_keep


#: how often a resting association's DUL thread looks at its socket, and pynetdicom's own interval
RESTING_LOOP_SECONDS = 0.01
ACTIVE_LOOP_SECONDS = 0.001


def rest(assoc: Any) -> None:
    """An association kept open with nothing to send stops polling, until ``wake``.

    pynetdicom's two threads per association poll every millisecond, open or idle: 8 to 9% of a
    core for an association doing nothing, more than opening one for each of the outbox's rounds
    costs when they come ten times a second. At rest the association's reactor thread waits at its
    checkpoint, as it does while a request waits for its answer, and the DUL thread looks at the
    socket every 10 ms: 1.5% of a core (0.5% at 50 ms, but the first request after a rest waits
    for the DUL thread's sleep to end: 3 ms an object more in rounds of four). The reactor thread
    is what notices a peer's release or abort and clears ``is_established``; while at rest,
    ``ready`` tells."""
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if checkpoint is None or not hasattr(assoc.dul, "_run_loop_delay"):
        return
    checkpoint.clear()
    assoc.dul._run_loop_delay = RESTING_LOOP_SECONDS


def wake(assoc: Any) -> None:
    """Undo ``rest``: the DUL thread polls as pynetdicom has it, the reactor thread runs again."""
    if hasattr(assoc.dul, "_run_loop_delay"):
        assoc.dul._run_loop_delay = ACTIVE_LOOP_SECONDS
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if checkpoint is not None:
        checkpoint.set()


def ready(assoc: Any) -> bool:
    """Established, and its DUL still in data transfer (state 6): not so once the peer released,
    aborted or closed the connection, even while the association rests."""
    state = getattr(getattr(assoc.dul, "state_machine", None), "current_state", "Sta6")
    return bool(assoc.is_established) and assoc.dul.is_alive() and state == "Sta6"
