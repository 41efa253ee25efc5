"""Deterministic UIDs: the same scan, model version and object give the same Series and SOP Instance
UIDs every time, so a resent or rebuilt object replaces itself in a PACS instead of doubling."""

from __future__ import annotations

import re

from pydicom.uid import PYDICOM_ROOT_UID, UID, generate_uid

#: pydicom's root, for sites that have none of their own (``dicom_uid_root`` sets it)
DEFAULT_ROOT = PYDICOM_ROOT_UID
#: a UID as a source may carry it: components of digits joined by dots, 64 characters at most. Looser
#: than PS3.5 9.1, which also forbids a component's leading zero (a fault of old devices that a PACS
#: takes); strict enough that a UID used in a file's path names a file and nothing else (no '/', no '..')
UID_LIKE = re.compile(r"[0-9]+(\.[0-9]+)*")


def uid_like(value: object) -> bool:
    text = str(value)
    return len(text) <= 64 and UID_LIKE.fullmatch(text) is not None


def derived_uid(root: str, *parts: str) -> UID:
    """A UID under ``root`` (ending in ".") derived from ``parts`` alone (a SHA-512 of them)."""
    prefix = root if root.endswith(".") else f"{root}."
    return generate_uid(prefix, entropy_srcs=[*parts])


def series_uid(root: str, sha256: str, model_version: str, kind: str) -> UID:
    """The series of one kind of object (``sr``, ``pmap``, ``sc``, ``pdf``) for one scan and model."""
    return derived_uid(root, sha256, model_version, kind, "series")


def instance_uid(root: str, sha256: str, model_version: str, object_key: str) -> UID:
    """One object: ``object_key`` is the kind, with the label for the per-label ones (``pmap:benign``)."""
    return derived_uid(root, sha256, model_version, object_key, "instance")


def study_series_uid(root: str, study_instance_uid: str, kind: str) -> UID:
    """The series of a study-level object (``study-pdf``): one per study, whatever its versions."""
    return derived_uid(root, study_instance_uid, kind, "study-series")


def study_object_uid(root: str, study_instance_uid: str, content_sha256: str, kind: str) -> UID:
    """One version of a study-level object: the same content gives the same instance (a resend
    replaces itself), a new version (a study report written again with more scans) a new one."""
    return derived_uid(root, study_instance_uid, content_sha256, kind, "study-instance")
