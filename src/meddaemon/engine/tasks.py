"""The tasks scans are routed to. The four presets are the classifiers of the seed projects
(DESIGN.md section 5); custom tasks come from configuration."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    labels: tuple[str, ...]
    kind: str


BUILTIN_TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("busi", "breast ultrasound", ("benign", "malignant", "normal"), "multiclass"),
        TaskSpec(
            "chestxray14",
            "chest X-ray, the 14 NIH ChestX-ray14 findings",
            (
                "Atelectasis",
                "Cardiomegaly",
                "Effusion",
                "Infiltration",
                "Mass",
                "Nodule",
                "Pneumonia",
                "Pneumothorax",
                "Consolidation",
                "Edema",
                "Emphysema",
                "Fibrosis",
                "Pleural_Thickening",
                "Hernia",
            ),
            "multilabel",
        ),
        TaskSpec("covid", "COVID-19 chest X-ray", ("normal", "covid"), "binary"),
        TaskSpec("histopathology", "breast histopathology patches (IDC)", ("idc_negative", "idc_positive"), "binary"),
    )
}
