"""Routing: a task folder, else the DICOM rules, else the default task, else unroutable."""

from pathlib import PurePosixPath

from meddaemon.config import RouteRule, load_settings
from meddaemon.daemon.router import route_scan
from meddaemon.engine.decode.types import ScanMetadata
from meddaemon.engine.tasks import BUILTIN_TASKS

RULES = load_settings(env={}).routing_rules
TASKS = set(BUILTIN_TASKS)


def dicom(**kw) -> ScanMetadata:
    return ScanMetadata(format="dicom", rows=8, columns=8, **kw)


def test_a_task_folder_wins_over_everything():
    route = route_scan(PurePosixPath("covid/a.dcm"), dicom(modality="US", body_part="BREAST"), RULES, TASKS, "busi")
    assert route.task == "covid"


def test_a_file_at_the_top_is_not_in_a_task_folder_even_if_named_like_one():
    assert route_scan(PurePosixPath("busi"), dicom(), RULES, TASKS).task is None


def test_breast_ultrasound_goes_to_busi_and_chest_radiographs_to_chestxray14():
    assert route_scan(PurePosixPath("a.dcm"), dicom(modality="US", body_part="BREAST"), RULES, TASKS).task == "busi"
    for modality in ("CR", "DX"):
        assert (
            route_scan(PurePosixPath("a.dcm"), dicom(modality=modality, body_part="chest "), RULES, TASKS).task
            == "chestxray14"
        )


def test_rules_apply_to_dicom_only():
    png = ScanMetadata(format="png", rows=8, columns=8, modality="US", body_part="BREAST")
    assert route_scan(PurePosixPath("a.png"), png, RULES, TASKS).task is None


def test_a_task_folder_is_named_whatever_its_case_unless_two_tasks_differ_only_by_it():
    for folder in ("BUSI", "Busi", "ChestXray14"):
        route = route_scan(PurePosixPath(f"{folder}/a.png"), ScanMetadata("png", 8, 8), RULES, TASKS)
        assert route.task == folder.lower() and route.why == f"task folder {folder}/"
    twins = {"busi", "Busi"}  # custom tasks that differ by case only: each its own folder, exactly
    assert route_scan(PurePosixPath("Busi/a.png"), ScanMetadata("png", 8, 8), RULES, twins).task == "Busi"
    assert route_scan(PurePosixPath("BUSI/a.png"), ScanMetadata("png", 8, 8), RULES, twins).task is None


def test_an_unroutable_file_in_a_folder_named_almost_like_a_task_says_which():
    route = route_scan(PurePosixPath("chestxray/a.png"), ScanMetadata("png", 8, 8), RULES, TASKS)
    assert route.task is None and route.why.endswith("(chestxray/ is not a task folder: did you mean chestxray14/?)")
    route = route_scan(PurePosixPath("misc/a.png"), ScanMetadata("png", 8, 8), RULES, TASKS)
    assert route.why == "no task folder, no matching routing rule and no default task"


def test_an_unknown_folder_falls_through_to_the_default_task():
    assert route_scan(PurePosixPath("misc/a.png"), ScanMetadata("png", 8, 8), RULES, TASKS, "covid").task == "covid"


def test_no_folder_no_rule_no_default_is_unroutable_with_the_reason():
    route = route_scan(PurePosixPath("a.dcm"), dicom(modality="MR", body_part="HEAD"), RULES, TASKS)
    assert route.task is None and "no matching routing rule" in route.why
    assert route.why.endswith(
        "(put it in a task folder: busi/, busi_binary/, chestxray14/, covid/, histopathology/; or set default_task)"
    )


def test_first_matching_rule_wins_and_omitted_keys_match_anything():
    rules = (RouteRule("covid", modality=("DX",), view_position=("PA",)), RouteRule("chestxray14", modality=("DX",)))
    assert route_scan(PurePosixPath("a"), dicom(modality="DX", view_position="PA"), rules, TASKS).task == "covid"
    assert route_scan(PurePosixPath("a"), dicom(modality="DX", view_position="AP"), rules, TASKS).task == "chestxray14"
    assert route_scan(PurePosixPath("a"), dicom(modality="DX"), rules, TASKS).task == "chestxray14"
