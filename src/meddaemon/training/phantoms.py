"""SYNTHETIC phantoms in each seed dataset's published layout (docs/design.md section 5), for the demo and
the tests: nothing here is patient data, and every dataset says so (a ``README.txt`` at its root,
a ``Comment`` text chunk in every PNG, ``synthetic_`` file names and notes where the layout leaves
names free).

The class is carried by something a model can learn, modelled on the sign a reader looks for:

- BUSI: ultrasound-like speckle; benign is an oval, smooth, wider-than-tall hypoechoic lesion with
  posterior enhancement, malignant an irregular, spiculated, taller-than-wide one with posterior
  shadowing, normal has none. Masks use BUSI's names (``benign (1)_mask.png``, sometimes a second
  ``_mask_1.png``), and a few images are near-duplicates of another, one of them filed under the
  other lesion class, as in the published dataset.
- ChestX-ray14: X-ray-like chests; each finding is drawn at a place of its own, in a box written to
  ``BBox_List_2017.csv``; several images per patient and ``train_val_list.txt``/``test_list.txt``
  split by patient.
- COVID: bilateral, peripheral, lower-zone ground-glass opacities; ``metadata.csv`` also names a few
  bacterial pneumonias and a lateral view that the covid task does not use.
- IDC: 50x50 H&E-like patches; IDC-positive patches are crowded with large dark nuclei.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from scipy.ndimage import gaussian_filter

from meddaemon.engine.tasks import BUILTIN_TASKS, NIH_FINDINGS, TaskSpec
from meddaemon.files import make_folders

SYNTHETIC_NOTE = "SYNTHETIC phantom written by meddaemon (medcli synth); not patient data"

BUSI_CLASSES = ("benign", "malignant", "normal")
#: NIH's headers as published: bracketed names cut in two by their commas, trailing empty columns.
NIH_ENTRY_HEADER = (
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
    "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]", "",
)  # fmt: skip
NIH_BBOX_HEADER = ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", "")
COVID_METADATA_HEADER = (
    "patientid", "offset", "sex", "age", "finding", "RT_PCR_positive", "survival", "view", "modality",
    "date", "location", "folder", "filename", "doi", "url", "license", "clinical_notes", "other_notes",
)  # fmt: skip
COVID_FINDING = "Pneumonia/Viral/COVID-19"
NORMAL_FINDING = "No Finding"
BACTERIAL_FINDING = "Pneumonia/Bacterial/Streptococcus"


@dataclass(frozen=True)
class PhantomSet:
    """What was written: the dataset root, images per label, and the planted near-duplicates."""

    task: str
    root: Path
    images: int
    per_label: dict[str, int]
    patients: int | None = None
    #: (original, copy) paths relative to ``root``; the copy is the original shifted and re-noised.
    near_duplicates: tuple[tuple[str, str], ...] = ()
    extra: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PhantomDefaults:
    count: int
    size: int
    count_means: str


#: the smallest side written: what every task's input contract takes (``InputContract.min_size``)
MIN_SIZE = 32

PHANTOM_DEFAULTS: dict[str, PhantomDefaults] = {
    "busi": PhantomDefaults(20, 128, "images per class"),
    "chestxray14": PhantomDefaults(60, 128, "images"),
    "covid": PhantomDefaults(20, 128, "images per class"),
    "histopathology": PhantomDefaults(24, 50, "patches per class"),
}


def phantoms_for(spec: TaskSpec) -> str | None:
    """The phantom set (``medcli synth`` argument) in the layout of ``spec``'s dataset: ``busi`` for
    both BUSI presets; None for a custom task, whose layout is a folder per class or a manifest."""
    if spec.dataset is None:
        return None
    return next((name for name in PHANTOM_DEFAULTS if BUILTIN_TASKS[name].dataset == spec.dataset), None)


def write_phantoms(
    task: str, out: Path, *, count: int | None = None, size: int | None = None, seed: int = 0
) -> PhantomSet:
    """Write the phantom dataset of ``task`` with ``out`` as its root (created; must be empty)."""
    writers: dict[str, Callable[..., PhantomSet]] = {
        "busi": write_busi,
        "chestxray14": write_chestxray14,
        "covid": write_covid,
        "histopathology": write_histopathology,
    }
    if task not in writers:
        raise ValueError(f"no phantoms for task {task!r}; tasks with phantoms: {', '.join(writers)}")
    defaults = PHANTOM_DEFAULTS[task]
    count = defaults.count if count is None else count
    size = defaults.size if size is None else size
    if count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    if size < MIN_SIZE:  # the tasks' input contracts refuse smaller images (histopathology's too)
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, not {size}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; phantoms are written into a new or empty folder")
    # an interrupted run left a dataset without its labels or its README.txt saying SYNTHETIC,
    # which the next run refused as not empty: it is written in a folder of its own beside or
    # inside ``out`` (an empty folder given may be a mount point, a link, the working folder),
    # then moved into place; on failure that folder goes, and nothing else
    given = out.is_dir()
    if not given:
        make_folders(out.parent)
    partial = (out if given else out.parent) / f".{out.name or 'synth'}.{uuid.uuid4().hex[:12]}.partial"
    partial.mkdir()  # not mkdtemp, whose folder is its owner's alone
    try:
        written = writers[task](partial, count=count, size=size, seed=seed)
        if given:
            _move_into(partial, out)
        else:
            partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return replace(written, root=out)


def _move_into(partial: Path, out: Path) -> None:
    """The entries of ``partial`` moved up into ``out``, none over a name another program took there
    meanwhile (a rename replaces a file without a word); on any failure, Ctrl-C included, those
    moved already go back, so that ``out`` holds none of the dataset."""
    entries = sorted(partial.iterdir())
    taken = [entry.name for entry in entries if os.path.lexists(out / entry.name)]
    if taken:
        raise FileExistsError(
            f"{out} is not empty any more ({', '.join(taken)} appeared while the phantoms were written)"
        )
    moved: list[Path] = []
    try:
        for entry in entries:
            entry.rename(out / entry.name)
            moved.append(entry)
    except BaseException:
        for entry in moved:
            (out / entry.name).rename(entry)
        raise
    partial.rmdir()


# --- shared drawing -------------------------------------------------------------------------------


def _save_png(path: Path, pixels: np.ndarray) -> None:
    """Write a uint8 grey or RGB array as PNG with the SYNTHETIC comment in a text chunk."""
    info = PngInfo()
    info.add_text("Comment", SYNTHETIC_NOTE)
    make_folders(path.parent)
    Image.fromarray(np.ascontiguousarray(pixels)).save(path, format="PNG", pnginfo=info)


def _write_readme(root: Path, layout: str, details: str) -> None:
    (root / "README.txt").write_text(
        f"SYNTHETIC DATA. {SYNTHETIC_NOTE}.\nLayout: {layout}.\n{details}\n", encoding="utf-8"
    )


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-scale noise that varies over about ``size / cells`` pixels."""
    coarse = Image.fromarray(rng.normal(size=(cells, cells)).astype(np.float32))
    return np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


def _blur(image: np.ndarray, radius: float) -> np.ndarray:
    return gaussian_filter(image.astype(np.float32), sigma=radius)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _ellipse(size: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    yy, xx = _grid(size)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _blob(size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    yy, xx = _grid(size)
    return np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (radius / 2) ** 2))).astype(np.float32)


def _shifted_copy(rng: np.random.Generator, pixels: np.ndarray) -> np.ndarray:
    """A near-duplicate: moved a pixel, a little brighter or darker, re-noised (a re-export or a crop)."""
    moved: np.ndarray = np.roll(pixels.astype(np.float32), shift=(1, 1), axis=(0, 1))
    moved = moved * rng.uniform(0.95, 1.05) + rng.normal(0, 2.0, size=pixels.shape)
    return np.clip(np.rint(moved), 0, 255).astype(np.uint8)


# --- BUSI -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LesionShape:
    """A lesion outline in polar form: an ellipse whose radius is modulated by harmonics and spikes."""

    cy: float
    cx: float
    ry: float
    rx: float
    angle: float
    harmonics: tuple[tuple[int, float, float], ...] = ()
    spikes: tuple[tuple[float, float, float], ...] = ()

    def mask(self, size: int) -> np.ndarray:
        yy, xx = _grid(size)
        dy, dx = yy - self.cy, xx - self.cx
        u = dx * math.cos(self.angle) + dy * math.sin(self.angle)
        v = -dx * math.sin(self.angle) + dy * math.cos(self.angle)
        theta = np.arctan2(v / self.ry, u / self.rx)
        rho = np.hypot(u / self.rx, v / self.ry)
        boundary = np.ones_like(theta)
        for k, amplitude, phase in self.harmonics:
            boundary += amplitude * np.cos(k * theta + phase)
        for at, width, length in self.spikes:
            off = np.angle(np.exp(1j * (theta - at)))
            boundary += length * np.exp(-((off / width) ** 2))
        return rho <= boundary


def _benign_lesion(rng: np.random.Generator, size: int, cy: float, cx: float, scale: float = 1.0) -> LesionShape:
    rx = rng.uniform(0.12, 0.2) * size * scale
    return LesionShape(
        cy, cx, ry=rx * rng.uniform(0.55, 0.8), rx=rx, angle=rng.uniform(-0.2, 0.2),
        harmonics=((2, rng.uniform(0, 0.05), rng.uniform(0, 2 * math.pi)),),
    )  # fmt: skip


def _malignant_lesion(rng: np.random.Generator, size: int, cy: float, cx: float, scale: float = 1.0) -> LesionShape:
    rx = rng.uniform(0.1, 0.16) * size * scale
    harmonics = tuple(
        (int(k), rng.uniform(0.06, 0.16), rng.uniform(0, 2 * math.pi)) for k in rng.choice(range(3, 9), 3)
    )
    spikes = tuple(
        (rng.uniform(-math.pi, math.pi), rng.uniform(0.06, 0.12), rng.uniform(0.35, 0.7))
        for _ in range(int(rng.integers(5, 10)))
    )
    return LesionShape(cy, cx, ry=rx * rng.uniform(1.0, 1.35), rx=rx, angle=rng.uniform(-0.3, 0.3),
                       harmonics=harmonics, spikes=spikes)  # fmt: skip


def _ultrasound(rng: np.random.Generator, size: int, lesions: list[tuple[str, np.ndarray]]) -> np.ndarray:
    """Speckle over layered tissue; each lesion hypoechoic, with posterior enhancement (benign) or
    shadowing (malignant) in the columns beneath it."""
    depth = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None]
    tissue = 0.62 - 0.22 * depth + 0.1 * _smooth_field(rng, size, 4) + 0.05 * _smooth_field(rng, size, 9)
    skin = rng.uniform(0.06, 0.12) * size
    tissue += 0.25 * np.exp(-(((np.arange(size, dtype=np.float32)[:, None] - skin) / (0.03 * size)) ** 2))
    for kind, mask in lesions:
        soft = _blur(mask.astype(np.float32), max(0.6, size / 128))
        beneath = np.maximum.accumulate(mask, axis=0) & ~mask
        posterior = _blur(beneath.astype(np.float32), size / 64) * np.exp(-np.cumsum(beneath, axis=0) / (0.25 * size))
        tissue = tissue * (1 - 0.75 * soft)
        tissue = tissue + 0.18 * posterior if kind == "benign" else tissue * (1 - 0.55 * posterior)
    speckle = rng.rayleigh(1.0, size=(size, size)).astype(np.float32) / math.sqrt(math.pi / 2)
    return _blur(np.clip(tissue, 0.02, 1.0) * speckle * 0.8, 0.5)


def _busi_sample(rng: np.random.Generator, size: int, label: str, second: bool) -> tuple[np.ndarray, list[np.ndarray]]:
    if label == "normal":
        return _to_uint8(_ultrasound(rng, size, [])), [np.zeros((size, size), dtype=bool)]
    draw = _benign_lesion if label == "benign" else _malignant_lesion
    shapes = [draw(rng, size, rng.uniform(0.38, 0.6) * size, rng.uniform(0.3, 0.7) * size)]
    if second:
        side = 0.18 if shapes[0].cx > size / 2 else 0.82
        shapes.append(draw(rng, size, rng.uniform(0.3, 0.45) * size, side * size, scale=0.5))
    masks = [s.mask(size) for s in shapes]
    return _to_uint8(_ultrasound(rng, size, [(label, m) for m in masks])), masks


def write_busi(root: Path, *, count: int, size: int, seed: int) -> PhantomSet:
    """``root/{benign,malignant,normal}/<class> (N).png`` with ``<class> (N)_mask.png`` (and a
    ``_mask_1.png`` for a second lesion), ``count`` images per class, as in Dataset_BUSI_with_GT."""
    rng = np.random.default_rng(seed)
    duplicates: list[tuple[str, str]] = []
    originals: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {}
    planted_copies = max(2, count // 10)
    for label in BUSI_CLASSES:
        copies = planted_copies if label != "normal" and count >= 6 else 0
        for n in range(1, count - copies + 1):
            second = label != "normal" and n % 8 == 3
            pixels, masks = _busi_sample(rng, size, label, second)
            name = f"{label}/{label} ({n}).png"
            originals[name] = (pixels, masks)
            _write_busi_image(root, name, pixels, masks)
        for k in range(copies):
            source_class = BUSI_CLASSES[1 - BUSI_CLASSES.index(label)] if k == 0 and label == "malignant" else label
            source = f"{source_class}/{source_class} ({k + 1}).png"
            pixels, masks = originals[source]
            name = f"{label}/{label} ({count - copies + k + 1}).png"
            _write_busi_image(root, name, _shifted_copy(rng, pixels), [np.roll(m, (1, 1), (0, 1)) for m in masks])
            duplicates.append((source, name))
    _write_readme(root, "Dataset_BUSI_with_GT", f"{count} images per class, {size}x{size}, seed {seed}.")
    return PhantomSet("busi", root, 3 * count, dict.fromkeys(BUSI_CLASSES, count), near_duplicates=tuple(duplicates))


def _write_busi_image(root: Path, name: str, pixels: np.ndarray, masks: list[np.ndarray]) -> None:
    path = root / name
    _save_png(path, pixels)
    for i, mask in enumerate(masks):
        suffix = "_mask" if i == 0 else f"_mask_{i}"
        _save_png(path.with_name(f"{path.stem}{suffix}.png"), np.where(mask, 255, 0).astype(np.uint8))


# --- chest X-ray (ChestX-ray14, COVID) ---------------------------------------------------------------


@dataclass(frozen=True)
class FindingSite:
    """Where a finding is drawn (fractions of the image side), how big and bright, and its sign:
    the local appearance a reader (and a small CNN, which pools away position) tells it apart by."""

    y: float
    x: float
    radius: float
    amplitude: float
    sign: str = "haze"


NIH_SITES: dict[str, FindingSite] = {
    "Atelectasis": FindingSite(0.62, 0.30, 0.07, 0.4, "plate"),
    "Cardiomegaly": FindingSite(0.64, 0.58, 0.0, 0.0),
    "Effusion": FindingSite(0.74, 0.27, 0.08, 0.45, "meniscus"),
    "Infiltration": FindingSite(0.45, 0.68, 0.08, 0.5, "patchy"),
    "Mass": FindingSite(0.40, 0.33, 0.07, 0.5, "disc"),
    "Nodule": FindingSite(0.33, 0.70, 0.035, 0.7, "dot"),
    "Pneumonia": FindingSite(0.54, 0.36, 0.08, 0.4, "lobar"),
    "Pneumothorax": FindingSite(0.24, 0.28, 0.08, -0.3, "pleural_line"),
    "Consolidation": FindingSite(0.62, 0.69, 0.07, 0.5, "bronchogram"),
    "Edema": FindingSite(0.46, 0.40, 0.1, 0.4, "septal_lines"),
    "Emphysema": FindingSite(0.22, 0.71, 0.08, -0.3, "bullae"),
    "Fibrosis": FindingSite(0.30, 0.36, 0.07, 0.4, "reticular"),
    "Pleural_Thickening": FindingSite(0.46, 0.20, 0.05, 0.45, "rind"),
    "Hernia": FindingSite(0.76, 0.50, 0.06, 0.45, "ring"),
}
#: How often each finding is drawn in an abnormal phantom, roughly as common as in NIH's data.
NIH_WEIGHTS = dict(zip(NIH_FINDINGS, (11, 3, 13, 20, 6, 6, 2, 5, 5, 3, 3, 2, 3, 0.8), strict=True))


@dataclass(frozen=True)
class Chest:
    """A phantom chest: pixels in [0, 1] and where its heart is (for Cardiomegaly's box)."""

    pixels: np.ndarray
    heart: tuple[float, float, float, float]


def _chest(rng: np.random.Generator, size: int, big_heart: bool = False) -> Chest:
    """A frontal chest whose position, build, lung fields and exposure vary from patient to patient."""
    s = float(size)
    dy, dx = rng.uniform(-0.08, 0.08, 2) * s
    build = rng.uniform(0.85, 1.1)
    image: np.ndarray = np.full((size, size), 0.06, dtype=np.float32)
    image[_ellipse(size, 0.55 * s + dy, 0.5 * s + dx, 0.47 * s * build, rng.uniform(0.36, 0.47) * s * build)] = 0.55
    for side in (-1, 1):
        ry, rx = rng.uniform(0.2, 0.3) * s * build, rng.uniform(0.1, 0.15) * s * build
        cy, cx = (0.47 + rng.uniform(-0.04, 0.04)) * s + dy, 0.5 * s + dx + side * rng.uniform(0.15, 0.22) * s * build
        image[_ellipse(size, cy, cx, ry, rx)] = rng.uniform(0.15, 0.28)
    image[:, int(0.47 * s + dx) : int(0.53 * s + dx) + 1] += 0.2
    heart_ry, heart_rx = 0.1 * s * build * (1.2 if big_heart else 1.0), 0.12 * s * build * (1.7 if big_heart else 1.0)
    heart_cy, heart_cx = 0.64 * s + dy, 0.56 * s + dx + (0.03 * s if big_heart else 0.0)
    image[_ellipse(size, heart_cy, heart_cx, heart_ry, heart_rx)] = 0.62
    image = _blur(image, s / 64) + 0.16 * _smooth_field(rng, size, 3) + 0.1 * _smooth_field(rng, size, 6)
    yy, xx = _grid(size)
    tilt_y, tilt_x = rng.uniform(-0.12, 0.12, 2)  # uneven exposure across the film
    image = image + tilt_y * (yy / s - 0.5) + tilt_x * (xx / s - 0.5)
    ribs = 0.03 * np.sin(np.linspace(0, rng.uniform(16, 22), size, dtype=np.float32))[:, None]
    image = image + ribs + rng.normal(0, 0.015, size=(size, size)).astype(np.float32)
    box = (heart_cx - heart_rx, heart_cy - heart_ry, 2 * heart_rx, 2 * heart_ry)
    return Chest(image, box)


def _finding_sign(
    rng: np.random.Generator, size: int, cy: float, cx: float, radius: float, sign: str
) -> tuple[np.ndarray, tuple[float, float]]:
    """The finding's opacity (about 0 to 1; the site's amplitude scales it) and its half height and
    width: a soft blob ("haze") or a sign of its own, each a few pixels across even at 64x64."""
    yy, xx = _grid(size)
    dy, dx = (yy - cy) / radius, (xx - cx) / radius
    r2 = dy**2 + dx**2
    soft = np.exp(-r2 / 0.5)
    period = max(3.0, size / 16)
    if sign == "disc":  # well-defined, round, dense
        return _blur((r2 <= 1).astype(np.float32), 0.6), (radius, radius)
    if sign == "dot":  # a small, sharp, very dense nodule with a faint halo
        return np.clip((r2 <= 1).astype(np.float32) + 0.3 * np.exp(-r2 / 4), 0, 1), (radius, radius)
    if sign == "septal_lines":  # perihilar haze crossed by short horizontal septal (Kerley B) lines
        lines = (np.abs(np.sin(math.pi * yy / period)) < 0.3) & (np.abs(dx) < 1.4) & (np.abs(dy) < 1.2)
        return 0.4 * soft + 0.8 * lines.astype(np.float32), (1.2 * radius, 1.4 * radius)
    if sign == "plate":  # plate-like: a thin horizontal band
        band = (dy / 0.3) ** 2 + (dx / 1.8) ** 2 <= 1
        return _blur(band.astype(np.float32), 0.6), (0.3 * radius, 1.8 * radius)
    if sign == "meniscus":  # a basal opacity whose upper edge curves up towards the chest wall
        edge = dy > -0.2 - 0.8 * np.clip(-dx, 0, None) ** 2
        return _blur((edge & (dy < 1) & (np.abs(dx) < 1.3)).astype(np.float32), 0.8), (radius, 1.3 * radius)
    if sign == "patchy":  # ill-defined mottled patches
        spots = _smooth_field(rng, size, max(4, size // 5)) > 0.3
        return soft * _blur(spots.astype(np.float32), 0.7) * 1.5, (radius, radius)
    if sign == "lobar":  # a dense, wedge-shaped lobar opacity with a straight fissure above
        wedge = (dy > -0.9) & (dy < 1) & (np.abs(dx) < 1.0 - 0.3 * dy)
        return _blur(wedge.astype(np.float32), 0.8) * (0.8 + 0.2 * soft), (radius, 1.2 * radius)
    if sign == "pleural_line":  # a lucent rim with no lung markings, edged by a bright pleural line
        lucent = _blur((r2 <= 1).astype(np.float32), 0.6)
        line = _blur(((r2 > 1) & (r2 <= 1.6)).astype(np.float32), 0.5)
        return lucent - 1.2 * line, (radius, radius)
    if sign == "bronchogram":  # dense opacity crossed by dark branching air bronchograms
        angle = rng.uniform(0, math.pi)
        along = dx * math.cos(angle) + dy * math.sin(angle)
        across = -dx * math.sin(angle) + dy * math.cos(angle)
        tubes = (np.abs(across) < 0.14) | (np.abs(across - 0.5 * along) < 0.14)
        dense = (r2 <= 1) & ~(tubes & (along > -0.8))
        return _blur(dense.astype(np.float32), 0.6), (radius, radius)
    if sign == "bullae":  # clustered lucent bullae, each with a thin bright wall
        out: np.ndarray = np.zeros((size, size), dtype=np.float32)
        for _ in range(4):
            by, bx = rng.uniform(-0.6, 0.6, 2)
            d2 = (dy - by) ** 2 + (dx - bx) ** 2
            out += (d2 <= 0.16).astype(np.float32) - 0.8 * ((d2 > 0.16) & (d2 <= 0.3)).astype(np.float32)
        return _blur(np.clip(out, -0.8, 1.0), 0.5), (radius, radius)
    if sign == "reticular":  # a net of fine lines
        net = (np.abs(np.sin(math.pi * yy / period)) < 0.35) | (np.abs(np.sin(math.pi * (xx + yy) / period)) < 0.35)
        return soft * net.astype(np.float32) * 1.4, (radius, radius)
    if sign == "rind":  # a thin bright band along the lateral chest wall
        rind = (dy / 2.0) ** 2 + (dx / 0.35) ** 2 <= 1
        return _blur(rind.astype(np.float32), 0.6), (2.0 * radius, 0.35 * radius)
    if sign == "ring":  # a round bright-walled shadow with a gas lucency inside (hiatus hernia)
        wall = ((r2 > 0.35) & (r2 <= 1)).astype(np.float32) - 0.8 * (r2 <= 0.25).astype(np.float32)
        return _blur(wall, 0.6), (radius, radius)
    return soft * (1 + 0.3 * _smooth_field(rng, size, 12)), (radius, radius)


def _draw_finding(rng: np.random.Generator, image: np.ndarray, site: FindingSite) -> tuple[float, float, float, float]:
    """Add the finding to ``image`` in place; its box (x, y, w, h) in pixels."""
    size = image.shape[0]
    cy, cx = (np.array([site.y, site.x]) + rng.uniform(-0.03, 0.03, 2)) * size
    radius = site.radius * size * rng.uniform(0.85, 1.2)
    if site.sign == "haze":  # the original soft blob (COVID's ground glass, Edema)
        texture = 1 + 0.3 * _smooth_field(rng, size, 12)
        image += site.amplitude * _blob(size, cy, cx, 2 * radius) * texture
        return (cx - radius, cy - radius, 2 * radius, 2 * radius)
    opacity, (half_h, half_w) = _finding_sign(rng, size, cy, cx, radius, site.sign)
    image += site.amplitude * opacity.astype(np.float32)
    return (cx - half_w, cy - half_h, 2 * half_w, 2 * half_h)


def _nih_findings(rng: np.random.Generator, forced: str | None) -> list[str]:
    if forced is not None:
        return [forced]
    if rng.random() < 0.4:
        return []
    weights = np.array([NIH_WEIGHTS[f] for f in NIH_FINDINGS])
    how_many = int(rng.choice([1, 1, 1, 2, 2, 3]))
    picked = rng.choice(len(NIH_FINDINGS), size=how_many, replace=False, p=weights / weights.sum())
    return [NIH_FINDINGS[i] for i in sorted(picked)]


def write_chestxray14(root: Path, *, count: int, size: int, seed: int) -> PhantomSet:
    """``root/images/00000001_000.png`` ..., ``Data_Entry_2017.csv``, ``BBox_List_2017.csv`` and the
    patient-wise ``train_val_list.txt``/``test_list.txt``, as NIH publishes ChestX-ray14. With
    ``count`` of 56 or more every finding is drawn at least once."""
    rng = np.random.default_rng(seed)
    patients = max(2, count // 3)
    test_patients = set(range(patients - max(1, patients // 5) + 1, patients + 1))
    entries: list[list[str]] = []
    boxes: list[list[str]] = []
    lists: dict[bool, list[str]] = {True: [], False: []}
    per_label = dict.fromkeys((*NIH_FINDINGS, "No Finding"), 0)
    follow_up = dict.fromkeys(range(1, patients + 1), 0)
    profile = {p: (int(rng.integers(18, 90)), str(rng.choice(["M", "F"]))) for p in follow_up}
    spacing = round(0.143 * 1024 / size, 3)
    for i in range(count):
        patient = i % patients + 1
        name = f"{patient:08d}_{follow_up[patient]:03d}.png"
        # every fourth image has one finding in turn, so the rare ones are not too rare to learn
        forced = NIH_FINDINGS[(i // 4) % len(NIH_FINDINGS)] if i % 4 == 1 else None
        findings = _nih_findings(rng, forced)
        chest = _chest(rng, size, big_heart="Cardiomegaly" in findings)
        for finding in findings:
            box = chest.heart if finding == "Cardiomegaly" else _draw_finding(rng, chest.pixels, NIH_SITES[finding])
            boxes.append([name, finding, *(f"{v:.3f}" for v in box), "", "", ""])
            per_label[finding] += 1
        per_label["No Finding"] += not findings
        _save_png(root / "images" / name, _to_uint8(chest.pixels))
        age, sex = profile[patient]
        view = "PA" if rng.random() < 0.7 else "AP"
        label_text = "|".join(findings) or "No Finding"
        row = [name, label_text, str(follow_up[patient]), str(patient), str(age), sex, view]
        entries.append([*row, str(size), str(size), str(spacing), str(spacing), ""])
        lists[patient in test_patients].append(name)
        follow_up[patient] += 1
    _write_csv(root / "Data_Entry_2017.csv", NIH_ENTRY_HEADER, entries)
    _write_csv(root / "BBox_List_2017.csv", NIH_BBOX_HEADER, boxes)
    (root / "train_val_list.txt").write_text("".join(f"{n}\n" for n in lists[False]), encoding="utf-8")
    (root / "test_list.txt").write_text("".join(f"{n}\n" for n in lists[True]), encoding="utf-8")
    _write_readme(root, "NIH ChestX-ray14", f"{count} images of {patients} patients, {size}x{size}, seed {seed}.")
    return PhantomSet("chestxray14", root, count, per_label, patients=patients, extra={"boxes": len(boxes)})


def _write_csv(path: Path, header: tuple[str, ...], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_covid(root: Path, *, count: int, size: int, seed: int) -> PhantomSet:
    """``root/metadata.csv`` and ``root/images/synthetic_*.png`` as in ieee8023/covid-chestxray-dataset:
    ``count`` COVID-19 and ``count`` "No Finding" frontal images, plus two bacterial pneumonias and
    one lateral COVID-19 view that the covid task leaves out."""
    rng = np.random.default_rng(seed)
    plan = [(COVID_FINDING, "PA")] * count + [(NORMAL_FINDING, "PA")] * count
    plan += [(BACTERIAL_FINDING, "PA")] * 2 + [(COVID_FINDING, "L")]
    rows: list[list[str]] = []
    patient, offset = 0, 0
    for i, (finding, view) in enumerate(plan):
        if i == 0 or rng.random() < 0.6 or plan[i - 1][0] != finding:
            patient, offset = patient + 1, 0
        else:
            offset += int(rng.integers(1, 6))
        chest = _chest(rng, size)
        if finding == COVID_FINDING:
            for x in (0.24, 0.76):
                _draw_finding(rng, chest.pixels, FindingSite(0.62, x, 0.1, 0.22))
        elif finding == BACTERIAL_FINDING:
            _draw_finding(rng, chest.pixels, FindingSite(0.5, 0.66, 0.08, 0.35))
        pixels = _to_uint8(chest.pixels if view != "L" else np.fliplr(chest.pixels.T))
        filename = f"synthetic_{patient:04d}_{offset:02d}.png"
        _save_png(root / "images" / filename, pixels)
        view_name = "AP" if view == "PA" and rng.random() < 0.3 else view
        rows.append([
            str(patient), str(offset), str(rng.choice(["M", "F"])), str(int(rng.integers(20, 90))), finding,
            "Y" if finding == COVID_FINDING else "", "", view_name, "X-ray", "2020", "SYNTHETIC", "images",
            filename, "", "", "CC0", "SYNTHETIC phantom", SYNTHETIC_NOTE,
        ])  # fmt: skip
    _write_csv(root / "metadata.csv", COVID_METADATA_HEADER, rows)
    _write_readme(root, "ieee8023/covid-chestxray-dataset", f"{count} images per class, {size}x{size}, seed {seed}.")
    return PhantomSet(
        "covid", root, len(plan), {"covid": count, "normal": count}, patients=patient, extra={"left_out": 3}
    )


# --- IDC histopathology ------------------------------------------------------------------------------

_STROMA = np.array([0.93, 0.68, 0.82], dtype=np.float32)
_FAT = np.array([0.97, 0.96, 0.97], dtype=np.float32)
_NUCLEUS = np.array([0.3, 0.16, 0.5], dtype=np.float32)


def _idc_patch(rng: np.random.Generator, size: int, positive: bool) -> np.ndarray:
    """An H&E-like patch: pink stroma and white fat; IDC-positive patches are crowded with large,
    dark, irregular nuclei, negative ones have few small ones."""
    field_ = _smooth_field(rng, size, 4)
    fat = (field_ > 0.8)[..., None] if not positive else np.zeros((size, size, 1), dtype=bool)
    image: np.ndarray = np.where(fat, _FAT, _STROMA * (1 + 0.05 * field_[..., None])).astype(np.float32)
    density, radii = (0.03, (1.6, 3.2)) if positive else (0.006, (0.9, 1.6))
    yy, xx = _grid(size)
    ink: np.ndarray = np.zeros((size, size), dtype=np.float32)
    for _ in range(int(rng.poisson(density * size * size))):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(*radii, 2)
        ink = np.maximum(ink, (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.float32))
    ink = _blur(ink, 0.6) * rng.uniform(0.8, 1.0)
    image = image * (1 - ink[..., None]) + _NUCLEUS * ink[..., None]
    image += rng.normal(0, 0.02, size=image.shape).astype(np.float32)
    return _to_uint8(image)


def write_histopathology(root: Path, *, count: int, size: int, seed: int) -> PhantomSet:
    """``root/<patient>/{0,1}/<patient>_idx5_x<X>_y<Y>_class<C>.png``: ``count`` patches per class
    spread over patients (six, or a quarter of ``count`` when more), as in the breast histopathology IDC dataset."""
    rng = np.random.default_rng(seed)
    patients = [str(90001 + p) for p in range(max(3, min(count, 6), count // 4))]
    for label in (0, 1):
        for i in range(count):
            patient = patients[i % len(patients)]
            x, y = 50 * (i // len(patients) + 1), 50 * (2 * label + 1)
            name = f"{patient}_idx5_x{x}_y{y}_class{label}.png"
            _save_png(root / patient / str(label) / name, _idc_patch(rng, size, positive=label == 1))
    _write_readme(root, "breast histopathology IDC", f"{count} patches per class, {size}x{size} RGB, seed {seed}.")
    return PhantomSet("histopathology", root, 2 * count, {"0": count, "1": count}, patients=len(patients))
