"""The tasks scans are routed to: the four classifiers of the seed projects (docs/design.md section 5)
as presets, and custom tasks from the ``[tasks.NAME]`` tables of the TOML config with the same fields.

A task says what a model for it must look like (labels, kind, input contract) and how to train one
(architecture, recipe, dataset layout); a model version (``engine/registry.py``) carries its own
copy of the contract it was trained with.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KINDS = ("multiclass", "binary", "multilabel")
#: stretch: straight to height x width; resize_then_crop: the shorter side to the target, then the centre
RESIZES = ("stretch", "resize_then_crop")
#: fixed: (x - mean) / std per channel; per_image: the image's own mean and std (Keras samplewise_center
#: + samplewise_std_normalization, as seed 003's course trained)
NORMALISATIONS = ("fixed", "per_image")
GREY_MEAN, GREY_STD = (0.449,), (0.226,)  # ImageNet statistics averaged over RGB, for 1-channel inputs
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def text_values(value: Any, what: str) -> tuple[str, ...]:
    """A config value that names one or more things: a text is one (``"CR"`` was read as ``C``, ``R``),
    a list of texts several; anything else is refused naming ``what`` (a number in a route's list
    stopped the daemon at the first DICOM, and again at every start)."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(f"{what} must be a text or a list of texts, not {value!r}")


#: the networks a model can be (``engine.architectures.build_model`` builds each); here, where the
#: config is checked without importing torch
ARCHITECTURES = (
    "small_cnn",
    "resnet18",
    "resnet34",
    "vgg16",
    "mobilenet_v2",
    "densenet121",
    "efficientnet_v2_s",
    "efficientnet_v2_s_selu",
)


@dataclass(frozen=True)
class InputContract:
    """What a scan must be to go into the model, and how it is turned into a tensor."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: DICOM modalities accepted; empty accepts any (PNG has no modality and is always accepted).
    modalities: tuple[str, ...] = ()
    #: Smaller images are refused rather than blown up (contract_mismatch).
    min_size: int = 32
    #: Longer side over shorter side; beyond this the image is not what the model was trained on.
    max_aspect: float = 4.0
    resize: str = "stretch"
    normalisation: str = "fixed"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):  # grey or RGB: what a decoded scan can be made into
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), not {self.channels!r}")
        for side in ("height", "width"):
            if getattr(self, side) < 1:
                raise ValueError(f"{side} must be at least 1 pixel, not {getattr(self, side)!r}")
        if self.resize not in RESIZES:
            raise ValueError(f"resize must be one of {list(RESIZES)}, not {self.resize!r}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {list(NORMALISATIONS)}, not {self.normalisation!r}")

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def resized_and_cropped(self, height: int, width: int) -> tuple[tuple[int, int], int, int]:
        """``resize_then_crop`` of an image of ``height`` x ``width``: the size it is resized to (the
        smallest that covers the input: for a square input, torchvision's ``Resize(side)``), and the
        first row and column of the centre crop taken from that (``preprocess.resize``). A
        non-square input had its shorter side scaled to its own shorter side: the crop's offsets
        went negative and the input came out a sliver (64 x 6 for 64 x 96)."""
        by_rows, by_columns = self.height / height, self.width / width
        rows = self.height if by_rows >= by_columns else max(self.height, int(height * by_columns))
        columns = self.width if by_columns >= by_rows else max(self.width, int(width * by_rows))
        return (rows, columns), round((rows - self.height) / 2.0), round((columns - self.width) / 2.0)

    def shown_window(self, height: int, width: int) -> tuple[float, float, float, float]:
        """The part of a ``height`` x ``width`` image the model's input shows, in the image's own
        pixels (edges, not centres): first row, first column, rows, columns. The whole image when
        it is stretched; the centre crop's share of it with ``resize_then_crop``."""
        if self.resize != "resize_then_crop":
            return 0.0, 0.0, float(height), float(width)
        scaled, top, left = self.resized_and_cropped(height, width)
        per_row, per_column = height / scaled[0], width / scaled[1]
        return top * per_row, left * per_column, self.height * per_row, self.width * per_column

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputContract:
        values = dict(data)
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(values[key])
        if "modalities" in values:
            values["modalities"] = text_values(values["modalities"], "modalities")
        return cls(**values)


#: the augmentations a recipe may name, as ``training.train.augment`` applies them
AUGMENTATIONS = ("hflip", "vflip", "rotate90", "rotate10", "brightness_contrast")


@dataclass(frozen=True)
class TrainingRecipe:
    """A seed's training recipe; every value can be overridden by ``medcli retrain`` flags."""

    loss: str
    optimizer: str
    learning_rate: float
    batch_size: int
    epochs: int
    scheduler: Mapping[str, Any] = field(default_factory=dict)
    early_stopping_patience: int | None = None
    class_weighting: bool = False
    #: names of ``AUGMENTATIONS``, applied to training images in that module's order
    augmentation: tuple[str, ...] = ()
    #: the (train, validation, test) fractions
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.augmentation) - set(AUGMENTATIONS))
        if unknown:
            raise ValueError(f"unknown augmentation {unknown}; choose from {', '.join(AUGMENTATIONS)}")
        if len(self.split) != 3 or min(self.split) < 0 or self.split[0] <= 0 or abs(sum(self.split) - 1) > 1e-6:
            raise ValueError(f"split must be (train, validation, test) fractions summing to 1, not {self.split}")


@dataclass(frozen=True)
class DatasetSource:
    """Where a preset's seed dataset is published and under which terms: the one place the CLI's
    hints and the README's Datasets table take it from (nothing is ever downloaded)."""

    name: str
    publisher: str
    #: where to get it (a DOI or the publisher's page; mirrors in brackets)
    published: str
    #: the licence as the publisher states it; the user checks the publisher's terms before use
    licence: str
    citation: str = ""

    def lines(self) -> list[str]:
        """The source as a few indented lines of text (for ``medcli`` messages)."""
        lines = [f"  {self.name}, {self.publisher}", f"  published: {self.published}", f"  licence: {self.licence}"]
        return [*lines, f"  cite: {self.citation}"] if self.citation else lines


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    labels: tuple[str, ...]
    kind: str
    architecture: str
    alternatives: tuple[str, ...]
    contract: InputContract
    recipe: TrainingRecipe
    dataset_layout: str = "folder-per-class"
    #: DICOM attributes that route a scan here (used when the config names no routing rules).
    route_modality: tuple[str, ...] = ()
    route_body_part: tuple[str, ...] = ()
    seed: str = ""
    #: where the seed dataset of a preset is published (None for custom tasks)
    dataset: DatasetSource | None = None

    @property
    def num_outputs(self) -> int:
        """Logits of the model head: one for binary (sigmoid of the positive class), else one per label."""
        return 1 if self.kind == "binary" else len(self.labels)


BUSI_SOURCE = DatasetSource(
    name="Breast Ultrasound Images Dataset (BUSI, Dataset_BUSI_with_GT)",
    publisher="Al-Dhabyani, Gomaa, Khaled and Fahmy (Cairo University, Baheya Hospital)",
    published="https://scholar.cu.edu.eg/?q=afahmy/pages/dataset, the page the article names "
    "(doi:10.1016/j.dib.2019.104863); also mirrored on Kaggle",
    licence="CC BY 4.0 per the Data in Brief article; check the publisher's terms",
    citation="Al-Dhabyani W et al. Dataset of breast ultrasound images. Data in Brief 28 (2020) 104863",
)
NIH_SOURCE = DatasetSource(
    name="NIH ChestX-ray14 (ChestX-ray8)",
    publisher="NIH Clinical Center",
    published="https://nihcc.app.box.com/v/ChestXray-NIHCC (also mirrored on Kaggle)",
    licence="public; the NIH Clinical Center asks for a citation and an acknowledgement; check the publisher's terms",
    citation="Wang X et al. ChestX-ray8: hospital-scale chest X-ray database and benchmarks. CVPR 2017",
)
COVID_SOURCE = DatasetSource(
    name="COVID-19 image data collection (covid-chestxray-dataset)",
    publisher="Cohen, Morrison, Dao et al. (ieee8023)",
    published="https://github.com/ieee8023/covid-chestxray-dataset",
    licence="per image: the license column of metadata.csv (a mix of CC BY, CC BY-NC-SA, Apache 2.0 and others); "
    "check each image's terms",
    citation="Cohen JP et al. COVID-19 image data collection. arXiv:2006.11988 (2020)",
)
IDC_SOURCE = DatasetSource(
    name="Breast histopathology images: invasive ductal carcinoma (IDC) patches",
    publisher="Janowczyk and Madabhushi (Case Western Reserve University)",
    published="doi:10.4103/2153-3539.186902 (use case 6); the 50x50 patches on Kaggle as breast-histopathology-images",
    licence="CC0 1.0 on Kaggle; check the publisher's terms",
    citation="Janowczyk A, Madabhushi A. Deep learning for digital pathology image analysis. "
    "J Pathol Inform 7:29 (2016)",
)

NIH_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip

BUILTIN_TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec(
            name="busi_binary",
            description="breast ultrasound: benign or malignant (normal left out; seed 000)",
            labels=("benign", "malignant"),
            kind="binary",
            architecture="small_cnn",
            alternatives=("mobilenet_v2", "resnet18"),
            contract=InputContract(1, 100, 100, GREY_MEAN, GREY_STD, modalities=("US",)),
            recipe=TrainingRecipe(
                loss="bce",
                optimizer="adam",
                learning_rate=2e-4,
                batch_size=4,
                epochs=30,
                scheduler={"name": "step", "step_size": 10, "gamma": 0.6},
                augmentation=("hflip", "rotate10"),
            ),
            dataset_layout="busi",
            dataset=BUSI_SOURCE,
            seed="000 (small CNN at 100x100, benign 0 / malignant 1, BCELoss, Adam 2e-4, StepLR 10/0.6, threshold 0.5)",
        ),
        TaskSpec(
            name="busi",
            description="breast ultrasound: benign, malignant or normal (BUSI)",
            labels=("benign", "malignant", "normal"),
            kind="multiclass",
            architecture="mobilenet_v2",
            alternatives=("resnet18", "vgg16", "small_cnn"),
            contract=InputContract(1, 224, 224, GREY_MEAN, GREY_STD, modalities=("US",)),
            recipe=TrainingRecipe(
                loss="cross_entropy",
                optimizer="adam",
                learning_rate=2e-4,
                batch_size=16,
                epochs=30,
                scheduler={"name": "step", "step_size": 10, "gamma": 0.6},
                early_stopping_patience=8,
                class_weighting=True,
                augmentation=("hflip", "rotate10", "brightness_contrast"),
            ),
            dataset_layout="busi",
            dataset=BUSI_SOURCE,
            route_modality=("US",),
            route_body_part=("BREAST",),
            seed="001 (MobileNetV2 1-channel, 3 classes: acc 89.74%, ROC-AUC 0.9548); "
            "000 (small CNN, Adam 2e-4, StepLR)",
        ),
        TaskSpec(
            name="chestxray14",
            description="chest X-ray: the 14 NIH ChestX-ray14 findings",
            labels=NIH_FINDINGS,
            kind="multilabel",
            architecture="densenet121",
            alternatives=("resnet18", "mobilenet_v2"),
            contract=InputContract(1, 320, 320, GREY_MEAN, GREY_STD, modalities=("CR", "DX")),
            recipe=TrainingRecipe(
                loss="weighted_bce",
                optimizer="adam",
                learning_rate=1e-4,
                batch_size=16,
                epochs=20,
                scheduler={"name": "plateau", "factor": 0.1, "patience": 1},
                early_stopping_patience=4,
                class_weighting=True,
                augmentation=("hflip",),
            ),
            dataset_layout="nih-chestxray14",
            dataset=NIH_SOURCE,
            route_modality=("CR", "DX"),
            route_body_part=("CHEST",),
            seed="003 (CheXNet-style DenseNet-121, 14 sigmoid outputs, imbalance-weighted loss, Grad-CAM)",
        ),
        TaskSpec(
            name="covid",
            description="COVID-19 on chest X-ray: covid or normal",
            labels=("normal", "covid"),
            kind="binary",
            architecture="mobilenet_v2",
            alternatives=("resnet18", "resnet34", "densenet121"),
            contract=InputContract(1, 224, 224, GREY_MEAN, GREY_STD, modalities=("CR", "DX")),
            recipe=TrainingRecipe(
                loss="bce",
                optimizer="adam",
                learning_rate=1e-4,
                batch_size=16,
                epochs=25,
                scheduler={"name": "plateau", "factor": 0.3, "patience": 3},
                early_stopping_patience=6,
                class_weighting=True,
                augmentation=("rotate10", "brightness_contrast"),
            ),
            dataset_layout="covid-chestxray",
            dataset=COVID_SOURCE,
            seed="004 (342 COVID / 193 healthy; MobileNetV2 best, 80% validation accuracy)",
        ),
        TaskSpec(
            name="histopathology",
            description="breast histopathology patches: invasive ductal carcinoma (IDC) or not",
            labels=("idc_negative", "idc_positive"),
            kind="binary",
            architecture="efficientnet_v2_s",
            alternatives=("resnet18", "mobilenet_v2"),
            contract=InputContract(3, 384, 384, IMAGENET_MEAN, IMAGENET_STD),
            recipe=TrainingRecipe(
                loss="bce_with_logits",
                optimizer="nadam",
                learning_rate=2e-3,
                batch_size=16,
                epochs=60,
                scheduler={"name": "plateau", "factor": 0.3, "patience": 7},
                early_stopping_patience=12,
                augmentation=("hflip", "vflip", "rotate90"),
                split=(0.7, 0.1, 0.2),  # seed 002: 70 % train, 20 % test, 10 % validation
            ),
            dataset_layout="idc",
            dataset=IDC_SOURCE,
            seed="002 (EfficientNetV2-S, BCEWithLogits, NAdam 0.002, ReduceLROnPlateau 0.3/7, early stop 12)",
        ),
    )
}


class TaskError(ValueError):
    pass


#: the longest task name and label the database keeps (``tasks.name``, ``results.label``)
MAX_NAME = 64
#: a custom task's name: a folder of the inbox and of the model registry
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
#: the keys of a ``[tasks.NAME]`` table and of its ``recipe``
TASK_KEYS = (
    "kind",
    "labels",
    "contract",
    "description",
    "architecture",
    "alternatives",
    "recipe",
    "dataset_layout",
    "route_modality",
    "route_body_part",
)
RECIPE_KEYS = (
    "loss",
    "optimizer",
    "learning_rate",
    "batch_size",
    "epochs",
    "scheduler",
    "early_stopping_patience",
    "class_weighting",
    "augmentation",
    "split",
)


def task_from_dict(name: str, data: Mapping[str, Any]) -> TaskSpec:
    """A custom task from its ``[tasks.NAME]`` table; errors name the task and the field."""
    try:
        _refuse_unknown(data, TASK_KEYS, "")
        _refuse_unknown(data.get("recipe", {}), RECIPE_KEYS, "recipe ")
        kind = str(data["kind"])
        if kind not in KINDS:
            raise TaskError(f"kind must be one of {KINDS}, not {kind!r}")
        if not 0 < len(name) <= MAX_NAME:
            raise TaskError(f"a task's name is 1 to {MAX_NAME} characters")
        if not TASK_NAME.fullmatch(name):
            raise TaskError(
                "a task's name is letters, digits, '_', '.' and '-', not starting with '.' or '-' "
                "(it names a folder of the inbox and of the model registry)"
            )
        architecture = str(data.get("architecture", "resnet18"))
        if architecture not in ARCHITECTURES:
            raise TaskError(f"architecture {architecture!r} is not one of {', '.join(ARCHITECTURES)}")
        labels = text_values(data["labels"], "labels")
        if len(labels) < 2:
            raise TaskError("a task needs at least two labels")
        if kind == "binary" and len(labels) != 2:
            raise TaskError(f"a binary task has two labels, the negative then the positive, not {len(labels)}")
        if len(set(labels)) != len(labels) or not all(0 < len(label) <= MAX_NAME for label in labels):
            raise TaskError(f"its labels must be distinct, each 1 to {MAX_NAME} characters")
        contract = data["contract"]
        _refuse_unknown(contract, CONTRACT_KEYS, "contract ")
        sizes = {key: _whole(contract, key, "contract", least=1) for key in ("channels", "height", "width")}
        defaults = (
            {"mean": GREY_MEAN, "std": GREY_STD}
            if sizes["channels"] == 1
            else {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
        )
        try:
            input_contract = InputContract.from_dict({**defaults, **contract, **sizes})
        except (TypeError, ValueError) as exc:
            raise TaskError(f"contract: {exc}") from None
        recipe = dict(data.get("recipe", {}))
        for key, least in (("batch_size", 1), ("epochs", 0), ("early_stopping_patience", 1)):
            if key in recipe:
                recipe[key] = _whole(recipe, key, "recipe", least)
        if "learning_rate" in recipe and not _number_above_0(recipe["learning_rate"]):
            raise TaskError(f"recipe.learning_rate: {recipe['learning_rate']!r} is not a number above 0")
        return TaskSpec(
            name=name,
            description=str(data.get("description", "")),
            labels=labels,
            kind=kind,
            architecture=architecture,
            alternatives=tuple(data.get("alternatives", ())),
            contract=input_contract,
            recipe=TrainingRecipe(
                loss=str(recipe.get("loss", "cross_entropy" if kind == "multiclass" else "bce_with_logits")),
                optimizer=str(recipe.get("optimizer", "adam")),
                learning_rate=float(recipe.get("learning_rate", 1e-4)),
                batch_size=int(recipe.get("batch_size", 16)),
                epochs=int(recipe.get("epochs", 20)),
                scheduler=dict(recipe.get("scheduler", {})),
                early_stopping_patience=recipe.get("early_stopping_patience"),
                class_weighting=bool(recipe.get("class_weighting", False)),
                augmentation=text_values(recipe.get("augmentation", ()), "augmentation"),
                split=tuple(float(v) for v in recipe.get("split", TrainingRecipe.split)),  # type: ignore[arg-type]
            ),
            dataset_layout=str(data.get("dataset_layout", "folder-per-class")),
            route_modality=text_values(data.get("route_modality", ()), "route_modality"),
            route_body_part=text_values(data.get("route_body_part", ()), "route_body_part"),
        )
    except TaskError as exc:
        raise TaskError(f"task {name!r}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise TaskError(f"task {name!r}: missing or invalid field {exc}") from None


CONTRACT_KEYS = tuple(f.name for f in dataclasses.fields(InputContract))


def _whole(table: Mapping[str, Any], key: str, what: str, least: int) -> int:
    """``table[key]``, a whole number of at least ``least``, or a ``TaskError`` naming it (a
    ``224.5`` or a ``"224"`` was a Python comparison error; a negative epoch count was taken
    until retraining refused it as if given by a flag)."""
    if key not in table:
        raise TaskError(f"{what}.{key} is missing")
    value = table[key]
    if isinstance(value, float) and value.is_integer():  # 224.0, which loaded before
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise TaskError(f"{what}.{key}: {table[key]!r} is not a whole number of at least {least}")
    return value


def _number_above_0(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _refuse_unknown(table: Any, known: tuple[str, ...], what: str) -> None:
    """A key the table does not take, named with the closest it does: a misspelt key (and a
    top-level setting written below the table, which TOML puts in it) was ignored without a word."""
    if not isinstance(table, Mapping):
        raise TaskError(f"{(what or 'the task').strip()} must be a table")
    unknown = sorted(set(table) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise TaskError(f"{what}has unknown keys {unknown}{hint}; known: {list(known)}")


def all_tasks(custom: Mapping[str, TaskSpec] | None = None) -> dict[str, TaskSpec]:
    return {**BUILTIN_TASKS, **(custom or {})}
