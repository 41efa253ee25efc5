"""Training a task's classifier, read top to bottom (in the style of torchvision's
``references/classification/train.py``):

1. :class:`TrainConfig`: every knob, its defaults taken from the task's recipe (``engine/tasks.py``).
2. :class:`ScanDataset`: a sample is decoded by the daemon's decoder and preprocessed by the daemon's
   :func:`~meddaemon.engine.preprocess.to_model_input`, so that served predictions match training.
3. :func:`make_loss`, :func:`make_optimizer`, :func:`make_scheduler`: loss per kind, with class weights.
4. :func:`train_one_epoch` and :func:`evaluate` (validation loss and macro ROC-AUC).
5. :func:`train`: the epoch loop; the best epoch by validation metric is kept, early stopping after
   ``patience`` epochs without improvement, a checkpoint after every epoch, ``resume`` from it.

Under ``torchrun --nproc-per-node N`` (``training/distributed.py``) the model is wrapped in
DistributedDataParallel and each process trains on its shard of the training set (a seeded
``DistributedSampler``): ``batch_size`` is per process, the global batch is ``batch_size x N``.
Rank 0 alone recalibrates BatchNorm (then broadcasts the statistics), evaluates, and checkpoints;
its validation loss and ROC-AUC are broadcast so that every process takes the same best-epoch and
early-stopping decisions.

Checkpoints are ``checkpoint.safetensors`` (model, best model and optimiser tensors, the RNG state)
plus ``checkpoint.json`` (epoch, optimiser and scheduler scalars, history): nothing is pickled, and
nothing is ever unpickled. On the CPU a run is deterministic: shuffling and augmentation are seeded
from (seed, epoch), so a resumed run gives the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from meddaemon.engine.architectures import ARCHITECTURES, Init, build_model, check_runs_at, imagenet_cache_path
from meddaemon.engine.preprocess import to_model_input
from meddaemon.engine.registry import probabilities
from meddaemon.engine.tasks import InputContract, TaskSpec
from meddaemon.failures import ScanFailure
from meddaemon.files import write_atomically
from meddaemon.training import MAX_SEED, distributed
from meddaemon.training.datasets import DatasetError, Sample
from meddaemon.training.images import decode_file

CHECKPOINT_WEIGHTS = "checkpoint.safetensors"
CHECKPOINT_STATE = "checkpoint.json"
OPTIMIZERS = ("adam", "adamw", "nadam", "sgd")
SCHEDULERS = ("none", "step", "plateau", "cosine")
#: the smallest square input a model is trained at (as ``medcli models import --image-size`` takes)
MIN_IMAGE_SIZE = 8
#: what a run whose images changed while it trained says to do
UNTOUCHED_UNTIL_THE_END = "the dataset left as it is until training ends; nothing was registered: train again"


class ChangedWhileTraining(DatasetError):
    """An image that no longer reads as it did when the dataset was split (removed, rewritten)."""


#: Preprocessed images are kept in memory when the whole set fits in this (small datasets).
CACHE_LIMIT_BYTES = 1 << 30


# --------------------------------------------------------------------------------------------
# 1. the configuration


@dataclass(frozen=True)
class TrainConfig:
    """How to train; :meth:`from_task` fills it from the task's recipe, any field can be overridden."""

    architecture: str
    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "adam"
    #: {"name": "step"|"plateau"|"cosine"|"none", ...} as in ``TrainingRecipe.scheduler``
    scheduler: Mapping[str, Any] = field(default_factory=dict)
    class_weighting: bool = True
    augmentation: bool = True
    #: which augmentations (``engine.tasks.AUGMENTATIONS``): the task recipe's
    augmentations: tuple[str, ...] = ("hflip", "rotate10")
    #: Epochs without a better validation metric before stopping; None trains every epoch.
    patience: int | None = None
    seed: int = 0
    #: Square input size; None keeps the task contract's height and width.
    image_size: int | None = None
    device: str = "cpu"
    num_workers: int = 0
    weight_decay: float = 0.0
    #: "auto": ImageNet weights when torchvision's file is in the local cache, else from scratch.
    init: str = "auto"
    #: The input contract trained on; None takes the task's (``--from``: the parent version's).
    input_contract: InputContract | None = None
    #: ``task/version@sha256:...`` of the registered version training starts from (``--from``), or "".
    parent: str = ""
    #: processes training together (torchrun's ``--nproc-per-node``): the global batch is
    #: ``batch_size`` x ``processes``, so a recipe without it does not give the same model again
    processes: int = 1

    def __post_init__(self) -> None:
        """Values no training can run with are refused here, before the dataset is read (an unknown
        architecture was a KeyError after an hour of hashing ChestX-ray14)."""
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        for name, value, least in (("epochs", self.epochs, 0), ("batch size", self.batch_size, 1)):
            if value < least:
                raise ValueError(f"the {name} must be at least {least}, not {value}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"the patience must be at least 1 epoch, not {self.patience}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"the seed must be from 0 to {MAX_SEED}, not {self.seed}")
        if not self.lr > 0:
            raise ValueError(f"the learning rate must be above 0, not {self.lr}")
        if self.image_size is not None and self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"the image size must be at least {MIN_IMAGE_SIZE} pixels, not {self.image_size}")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"unknown device {self.device!r}; choose cpu or cuda (cuda:N)") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"the device must be cpu or cuda (cuda:N), not {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: no CUDA device is available here; use --device cpu")

    @classmethod
    def from_task(cls, spec: TaskSpec, **overrides: Any) -> TrainConfig:
        recipe = spec.recipe
        config = cls(
            architecture=spec.architecture,
            epochs=recipe.epochs,
            batch_size=recipe.batch_size,
            lr=recipe.learning_rate,
            optimizer=recipe.optimizer,
            scheduler=dict(recipe.scheduler),
            class_weighting=recipe.class_weighting,
            augmentation=bool(recipe.augmentation),
            augmentations=tuple(recipe.augmentation),
            patience=recipe.early_stopping_patience,
        )
        return replace(config, **{k: v for k, v in overrides.items() if v is not None})

    def contract(self, spec: TaskSpec) -> InputContract:
        """The input contract (the task's, or the parent's) at this run's image size; the version registers it."""
        base = self.input_contract or spec.contract
        if self.image_size is None:
            return base
        return replace(base, height=self.image_size, width=self.image_size)

    def check_trainable(self, spec: TaskSpec) -> None:
        """The network runs at this run's input size, and, with ``--batch-size 1``, trains on one
        image: refused here, before the dataset is read. densenet121 at 16 pixels ended in a
        traceback ("Output size is too small") once the images were hashed; a batch of one image
        where the last feature map is 1 x 1 (mobilenet_v2 at 32 pixels) in PyTorch's "Expected more
        than 1 value per channel when training", batch normalisation having one value per channel."""
        contract = self.contract(spec)
        model = build_model(self.architecture, contract.channels, spec.num_outputs)
        try:
            check_runs_at(model, self.architecture, contract.channels, contract.height, contract.width)
        except ValueError as exc:
            raise ValueError(f"{exc}; use a larger --image-size") from None
        if self.batch_size == 1:
            try:
                with torch.no_grad():
                    model.train()(torch.zeros(1, contract.channels, contract.height, contract.width))
            except ValueError:
                raise ValueError(
                    f"a batch size of 1 cannot train {self.architecture} at {contract.height} x {contract.width} "
                    "pixels: its last feature map is 1 x 1, and batch normalisation needs more than one value per "
                    "channel; use --batch-size 2 or more, or a larger --image-size"
                ) from None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scheduler"] = dict(self.scheduler)
        data["input_contract"] = None if self.input_contract is None else self.input_contract.as_dict()
        return data


# --------------------------------------------------------------------------------------------
# 2. the data


def targets_for(samples: Sequence[Sample], labels: Sequence[str], kind: str) -> Tensor:
    """multiclass: class indices (long); binary: 1.0 for ``labels[1]`` (N, 1); multilabel: multi-hot (N, L)."""
    column = {label: i for i, label in enumerate(labels)}
    if kind == "multiclass":
        return torch.tensor([column[s.label] for s in samples], dtype=torch.long)
    if kind == "binary":
        return torch.tensor([[1.0 if s.label == labels[1] else 0.0] for s in samples])
    hot = torch.zeros(len(samples), len(labels))
    for row, sample in enumerate(samples):
        for label in sample.labels:
            hot[row, column[label]] = 1.0
    return hot


def one_hot(targets: Tensor, n_labels: int, kind: str) -> np.ndarray:
    """Targets as (N, L) 0/1, the shape of the probabilities (binary: [negative, positive])."""
    if kind == "multiclass":
        return F.one_hot(targets, n_labels).numpy()
    if kind == "binary":
        positive = targets[:, 0].numpy()
        return np.stack([1 - positive, positive], axis=1)
    return targets.numpy()


class ScanDataset(Dataset[tuple[Tensor, Tensor]]):
    """Samples decoded like the daemon decodes a scan and preprocessed by ``to_model_input``.

    Preprocessed images are cached in memory when they fit (they are the same every epoch);
    augmentation is applied after, on training sets only, seeded from (seed, epoch, index) so that
    every run sees the same.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        labels: Sequence[str],
        kind: str,
        contract: InputContract,
        *,
        augment: Sequence[str] = (),
        seed: int = 0,
    ) -> None:
        self.samples = list(samples)
        self.contract = contract
        self.targets = targets_for(self.samples, labels, kind)
        self.augment = tuple(augment)
        self.seed = seed
        self.epoch = 0
        self._cache: dict[int, Tensor] = {}
        size = len(self.samples) * contract.channels * contract.height * contract.width * 4
        self.cache = size <= CACHE_LIMIT_BYTES

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def image(self, i: int) -> Tensor:
        if i in self._cache:
            return self._cache[i]
        path = self.samples[i].path
        try:
            scan = decode_file(path)
        except ScanFailure as failure:  # read whole when the dataset was split: changed or removed since
            raise ChangedWhileTraining(
                path, f"{failure.reason.value} while the model trained ({failure.message})", UNTOUCHED_UNTIL_THE_END
            ) from None
        x = torch.from_numpy(to_model_input(scan, self.contract)[0])
        if self.cache:
            self._cache[i] = x
        return x

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.image(i)
        if self.augment:
            generator = torch.Generator().manual_seed(torch_seed((self.seed * 1_000_003 + self.epoch) * 100_003 + i))
            x = augment(x, generator, self.augment)
        return x, self.targets[i]


def augment(x: Tensor, generator: torch.Generator, kinds: Sequence[str] = ("hflip", "rotate10")) -> Tensor:
    """The recipe's augmentations (``kinds``) of a (C, H, W) normalised image, in this order:
    ``hflip`` and ``vflip`` half the time each; ``rotate10``, a small affine (rotation up to 10
    degrees, shift up to 5 %, scale 0.95-1.05, borders by reflection); ``rotate90``, a quarter turn
    0 to 3 times (square images); ``brightness_contrast``, contrast 0.9-1.1 about the image's mean
    and brightness up to 0.1 (the normalised scale: a tenth of a standard deviation)."""
    r = torch.rand(9, generator=generator)
    if "hflip" in kinds and r[0] < 0.5:
        x = x.flip(-1)
    if "vflip" in kinds and r[5] < 0.5:
        x = x.flip(-2)
    if "rotate10" in kinds:
        angle = math.radians((float(r[1]) * 2 - 1) * 10)
        scale = 1 + (float(r[2]) * 2 - 1) * 0.05
        tx, ty = (float(r[3]) * 2 - 1) * 0.05 * 2, (float(r[4]) * 2 - 1) * 0.05 * 2
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        theta = torch.tensor([[cos, -sin, tx], [sin, cos, ty]], dtype=x.dtype).unsqueeze(0)
        grid = F.affine_grid(theta, [1, *x.shape], align_corners=False)
        x = F.grid_sample(x.unsqueeze(0), grid, padding_mode="reflection", align_corners=False)[0]
    if "rotate90" in kinds and x.shape[-1] == x.shape[-2]:
        x = torch.rot90(x, int(float(r[6]) * 4) % 4, dims=(-2, -1))
    if "brightness_contrast" in kinds:
        mean = x.mean()
        x = (x - mean) * (0.9 + 0.2 * float(r[7])) + mean + (float(r[8]) * 2 - 1) * 0.1
    return x


def make_loader(dataset: ScanDataset, config: TrainConfig, *, shuffle: bool, epoch: int = 0) -> DataLoader[Any]:
    """A loader whose shuffling is seeded from (seed, epoch): the same order on a resumed run.
    Under DDP a shuffled loader gives this process its shard (``DistributedSampler``, same seeds).
    A shuffled epoch whose last batch would hold one image leaves it out (it is in another batch
    next epoch): batch normalisation of one image over a 1 x 1 feature map cannot train
    ("Expected more than 1 value per channel", mobilenet_v2 at 32 pixels, 17 images in 16s)."""
    generator = torch.Generator().manual_seed(torch_seed(config.seed * 1000 + epoch))
    sampler: DistributedSampler[Any] | None = None
    if shuffle and distributed.world_size() > 1:
        sampler = DistributedSampler(
            dataset, num_replicas=distributed.world_size(), rank=distributed.rank(), shuffle=True, seed=config.seed
        )
        sampler.set_epoch(epoch)
    shard = len(sampler) if sampler is not None else len(dataset)
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        drop_last=shuffle and shard > config.batch_size and shard % config.batch_size == 1,
        generator=generator,
        num_workers=config.num_workers,
        pin_memory=config.device.startswith("cuda"),
    )


# --------------------------------------------------------------------------------------------
# 3. loss, optimiser, scheduler


def make_loss(kind: str, targets: Tensor, n_labels: int, class_weighting: bool) -> nn.Module:
    """multiclass: CrossEntropy weighted by inverse class frequency; binary and multilabel:
    BCEWithLogits with ``pos_weight`` = negatives / positives per output."""
    if kind == "multiclass":
        if not class_weighting:
            return nn.CrossEntropyLoss()
        counts = torch.bincount(targets, minlength=n_labels).float().clamp(min=1)
        return nn.CrossEntropyLoss(weight=counts.sum() / (n_labels * counts))
    if not class_weighting:
        return nn.BCEWithLogitsLoss()
    positives = targets.sum(dim=0)
    return nn.BCEWithLogitsLoss(pos_weight=(len(targets) - positives).clamp(min=1) / positives.clamp(min=1))


def make_optimizer(name: str, params: Iterator[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "nadam":
        return torch.optim.NAdam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


Scheduler = torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau


def make_scheduler(optimizer: torch.optim.Optimizer, spec: Mapping[str, Any], epochs: int) -> Scheduler | None:
    name = spec.get("name", "none")
    if name == "none":
        return None
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, int(spec.get("step_size", 10)), float(spec.get("gamma", 0.1)))
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=float(spec.get("factor", 0.1)), patience=int(spec.get("patience", 3))
        )
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")


# --------------------------------------------------------------------------------------------
# 4. one epoch of training, and evaluation


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision (bf16) on CUDA only; fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_one_epoch(
    model: nn.Module,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[Any],
    device: torch.device,
    *,
    label: str = "train",
    show_progress: bool = False,
) -> float:
    """One pass over ``loader``; the mean training loss."""
    model.train()
    total, count = 0.0, 0
    bar: Any = (
        click.progressbar(length=len(loader), label=label, item_show_func=lambda s: s, file=sys.stderr)
        if show_progress
        else contextlib.nullcontext()
    )
    with bar:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(x)
            count += len(x)
            if show_progress:
                bar.update(1, f"loss {total / count:.4f}")
    return total / max(count, 1)


@dataclass
class Evaluation:
    loss: float
    #: (N, L) probabilities as the daemon computes them (``registry.probabilities``)
    probabilities: np.ndarray
    #: (N, L) 0/1 truth in the same columns
    truth: np.ndarray
    auc: float


@torch.no_grad()
def evaluate(
    model: nn.Module, loss_fn: nn.Module, loader: DataLoader[Any], device: torch.device, kind: str
) -> Evaluation:
    """Loss, probabilities and macro ROC-AUC over ``loader`` (in eval mode)."""
    model.eval()
    losses, probs, targets = [], [], []
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with _autocast(device):
            logits = model(x)
        logits = logits.float()
        losses.append(float(loss_fn(logits, y)) * len(x))
        probs.append(probabilities(logits, kind).cpu())
        targets.append(y.cpu())
    n_labels = probs[0].shape[1] if probs else 0
    p = torch.cat(probs).numpy() if probs else np.zeros((0, n_labels))
    truth = one_hot(torch.cat(targets), n_labels, kind) if targets else np.zeros((0, n_labels))
    loss = sum(losses) / max(len(p), 1)
    return Evaluation(loss, p, truth, macro_auc(truth, p, kind))


def macro_auc(truth: np.ndarray, probs: np.ndarray, kind: str) -> float:
    """Macro ROC-AUC (one-vs-rest for multiclass, the positive class for binary); NaN when undefined."""
    columns = [1] if kind == "binary" else range(truth.shape[1])
    aucs = [float(roc_auc_score(truth[:, j], probs[:, j])) for j in columns if 0 < truth[:, j].sum() < len(truth)]
    return float(np.mean(aucs)) if aucs else float("nan")


# --------------------------------------------------------------------------------------------
# 5. the epoch loop, checkpoints and resume


@dataclass
class TrainResult:
    model: nn.Module
    config: TrainConfig
    contract: InputContract
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]]
    validation: Evaluation
    #: "scratch", "imagenet", or "from <task>/<version>@sha256:..." (``config.parent``)
    init: str = "scratch"


def torch_seed(value: int) -> int:
    """A seed derived from ``--seed`` (any of 0 to ``MAX_SEED``) that torch takes: under 2**63."""
    return value % 2**63


def _seed_everything(seed: int) -> None:
    torch.manual_seed(torch_seed(seed))
    np.random.seed(seed % 2**32)


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def train(
    spec: TaskSpec,
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    config: TrainConfig,
    workdir: Path,
    *,
    resume: bool = False,
    show_progress: bool = False,
    log: Callable[[str], None] = lambda _line: None,
    stop_after: int | None = None,
    initial_weights: Mapping[str, Tensor] | None = None,
) -> TrainResult:
    """Train ``config.architecture`` for ``spec`` on ``train_samples``; keep the best epoch on
    ``val_samples``. A checkpoint is written to ``workdir`` after every epoch; ``resume`` continues
    from it. ``stop_after`` ends the run after that many epochs (as if interrupted; for tests).
    ``initial_weights`` (a parent version's, ``config.parent`` naming it) are where training starts.

    Under torchrun (the process group set up by :func:`distributed.setup`) every process calls this;
    only rank 0 evaluates and writes checkpoints, and only its result's ``validation`` is meaningful."""
    device = torch.device(distributed.setup(config.device))
    main = distributed.is_main()
    if not main:
        log, show_progress = (lambda _line: None), False
    contract = config.contract(spec)
    workdir.mkdir(parents=True, exist_ok=True)
    with _deterministic():
        _seed_everything(config.seed)
        init: Init = "scratch" if initial_weights is not None else resolve_init(config, log)
        model = build_model(config.architecture, contract.channels, spec.num_outputs, init=init)
        if initial_weights is not None:
            model.load_state_dict(initial_weights, strict=True)
            log(f"starting from the weights of {config.parent or 'the given version'}")
        model.to(device)
        train_set = ScanDataset(
            train_samples,
            spec.labels,
            spec.kind,
            contract,
            augment=config.augmentations if config.augmentation else (),
            seed=config.seed,
        )
        val_set = ScanDataset(val_samples, spec.labels, spec.kind, contract)
        loss_fn = make_loss(spec.kind, train_set.targets, len(spec.labels), config.class_weighting).to(device)
        optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr, config.weight_decay)
        scheduler = make_scheduler(optimizer, config.scheduler, config.epochs)

        state = _TrainingState()
        best_weights = _cpu_state(model)
        if resume:
            state, best_weights = load_checkpoint(workdir, model, optimizer, scheduler, config)
            log(f"resumed from {workdir / CHECKPOINT_WEIGHTS} after epoch {state.epoch}")
        elif main:  # an earlier run's checkpoint is not this run's: Ctrl-C now would offer to resume from it
            for name in (CHECKPOINT_STATE, CHECKPOINT_WEIGHTS):
                (workdir / name).unlink(missing_ok=True)
        val = Evaluation(math.nan, np.zeros((0, 0)), np.zeros((0, 0)), math.nan)  # rank 0 evaluates
        net = distributed.wrap(model, device)  # DDP: rank 0's weights on every process, gradients averaged

        while state.epoch < config.epochs and not state.stopped_early:
            epoch = state.epoch
            # dropout: the same on a resumed run (and different on each process)
            _seed_everything(config.seed * 1000 + epoch + 1_000_003 * distributed.rank())
            train_set.set_epoch(epoch)
            loader = make_loader(train_set, config, shuffle=True, epoch=epoch)
            train_loss = train_one_epoch(
                net, loss_fn, optimizer, loader, device, label=f"epoch {epoch + 1}/{config.epochs}",
                show_progress=show_progress,
            )  # fmt: skip
            train_loss = distributed.mean(train_loss, device)
            if main:  # the whole training set and the whole validation set, on rank 0 alone
                recalibrate_batchnorm(model, make_loader(train_set, config, shuffle=False), device)
                val = evaluate(model, loss_fn, make_loader(val_set, config, shuffle=False), device, spec.kind)
            distributed.broadcast_buffers(model)  # rank 0's BatchNorm statistics
            val.loss, val.auc = distributed.broadcast_floats([val.loss, val.auc], device)  # rank 0's decision
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(val.loss)
            elif scheduler is not None:
                scheduler.step()
            score = _score(val)
            improved = state.best_score is None or score > state.best_score
            improved = improved or (score == state.best_score and val.loss < state.best_loss)
            if improved:
                state.best_score, state.best_loss, state.best_epoch, state.since_best = score, val.loss, epoch + 1, 0
                best_weights = _cpu_state(model)
            else:
                state.since_best += 1
            state.history.append(
                {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val.loss, "val_auc": val.auc,
                 "lr": optimizer.param_groups[0]["lr"]}
            )  # fmt: skip
            state.epoch = epoch + 1
            if config.patience is not None and state.since_best >= config.patience:
                state.stopped_early = True
            if main:
                save_checkpoint(workdir, model, best_weights, optimizer, scheduler, config, state)
            # said once its checkpoint is written: a Ctrl-C right after the line was told "nothing to resume"
            log(
                f"epoch {epoch + 1}/{config.epochs}: train loss {train_loss:.4f}  val loss {val.loss:.4f}  "
                f"val ROC-AUC {val.auc:.4f}{'  (best)' if improved else ''}"
            )
            if state.stopped_early:
                log(f"early stop: no better validation metric for {config.patience} epochs")
            if stop_after is not None and state.epoch >= stop_after:
                break

        model.load_state_dict(best_weights)
        if main:
            val = evaluate(model, loss_fn, make_loader(val_set, config, shuffle=False), device, spec.kind)
    return TrainResult(
        model=model,
        config=config,
        contract=contract,
        best_epoch=state.best_epoch,
        epochs_run=state.epoch,
        stopped_early=state.stopped_early,
        history=state.history,
        validation=val,
        init=f"from {config.parent}" if initial_weights is not None else init,
    )


def resolve_init(config: TrainConfig, log: Callable[[str], None]) -> Init:
    """ImageNet initialisation only from a file already on this machine; nothing is downloaded."""
    if config.init in ("scratch", "imagenet"):
        return "scratch" if config.init == "scratch" else "imagenet"
    if config.init != "auto":
        raise ValueError(f"init must be auto, scratch or imagenet, not {config.init!r}")
    if config.architecture != "small_cnn" and imagenet_cache_path(config.architecture).is_file():
        log(f"starting from the ImageNet weights in {imagenet_cache_path(config.architecture)}")
        return "imagenet"
    if config.architecture != "small_cnn":
        log(f"training {config.architecture} from scratch: no ImageNet weights on this machine")
    return "scratch"


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader: DataLoader[Any], device: torch.device) -> None:
    """Recompute BatchNorm running statistics as exact averages over the training set with this
    epoch's final weights ("precise BN"). With few batches per epoch, the moving averages lag the
    weights so far that eval mode can call one class for every image; this keeps eval honest.

    A last batch of one image is left out, as the training loader drops it: BatchNorm in train mode
    cannot take one image over a 1 x 1 map (mobilenet_v2 at 32 pixels on 33 training images in
    batches of 16 stopped at the end of its first epoch, and again on every resume)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for i, (x, _) in enumerate(loader):
        if len(x) == 1 and i > 0 and (loader.batch_size or 1) > 1:  # a last batch of one; batches of one go
            continue
        with _autocast(device):
            model(x.to(device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


def _score(val: Evaluation) -> float:
    """The validation metric (macro ROC-AUC), or minus the loss where the AUC is undefined."""
    return val.auc if math.isfinite(val.auc) else -val.loss


def _cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


@dataclass
class _TrainingState:
    epoch: int = 0
    best_epoch: int = 0
    best_score: float | None = None
    best_loss: float = math.inf
    since_best: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)


def save_checkpoint(
    workdir: Path,
    model: nn.Module,
    best_weights: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler | None,
    config: TrainConfig,
    state: _TrainingState,
) -> None:
    """``checkpoint.safetensors`` (tensors) and ``checkpoint.json`` (everything else): no pickle.

    The optimiser's per-parameter state is flattened: tensors to ``optimizer.<param>.<name>``,
    scalars to the JSON. The JSON is written last and names the weights' epoch, so a crash between
    the two files is seen at resume.
    """
    from safetensors.torch import save

    tensors: dict[str, Tensor] = {}
    for k, v in model.state_dict().items():
        tensors[f"model.{k}"] = v.detach().to("cpu").contiguous()
    for k, v in best_weights.items():
        tensors[f"best.{k}"] = v.contiguous()
    optim = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for param, values in optim["state"].items():
        for name, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{param}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(param), {})[name] = value
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "format": "meddaemon-checkpoint/1",
        "epoch": state.epoch,
        "best_epoch": state.best_epoch,
        "best_score": state.best_score,
        "best_loss": state.best_loss,
        "since_best": state.since_best,
        "stopped_early": state.stopped_early,
        "history": state.history,
        "config": config.as_dict(),
        "optimizer": {"param_groups": optim["param_groups"], "scalars": scalars},
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
    }
    data = save(tensors, metadata={"epoch": str(state.epoch)})
    write_atomically(workdir / CHECKPOINT_WEIGHTS, data)
    write_atomically(workdir / CHECKPOINT_STATE, json.dumps(meta, indent=1, default=_jsonable).encode("utf-8"))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def checkpoint_epoch(workdir: Path, written_since: float | None = None) -> int | None:
    """The epoch the checkpoint in ``workdir`` was written after (``--resume`` continues from it), or
    None; with ``written_since`` (a ``time.time()``), None for a checkpoint written before it (an
    earlier run's, which a run without ``--resume`` removes only once its training starts)."""
    state_file = workdir / CHECKPOINT_STATE
    if not (workdir / CHECKPOINT_WEIGHTS).is_file() or not state_file.is_file():
        return None
    try:
        if written_since is not None and state_file.stat().st_mtime < written_since:
            return None
        epoch = int(json.loads(state_file.read_text(encoding="utf-8"))["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return epoch if _weights_epoch(workdir / CHECKPOINT_WEIGHTS) == epoch else None


def _weights_epoch(weights: Path) -> int | None:
    """The epoch ``checkpoint.safetensors`` says it holds (its metadata), or None."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            return int((handle.metadata() or {})["epoch"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None


def load_checkpoint(
    workdir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler | None,
    config: TrainConfig,
) -> tuple[_TrainingState, dict[str, Tensor]]:
    """Restore what :func:`save_checkpoint` wrote; a checkpoint of another configuration is refused."""
    from safetensors.torch import load_file

    meta = resumable_checkpoint(workdir, config)
    tensors = load_file(str(workdir / CHECKPOINT_WEIGHTS))
    model.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    best = {k[len("best.") :]: v for k, v in tensors.items() if k.startswith("best.")}
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, param, name = key.split(".", 2)
            per_param.setdefault(int(param), {})[name] = value
    for param, values in meta["optimizer"]["scalars"].items():
        per_param.setdefault(int(param), {}).update(values)
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["optimizer"]["param_groups"]})
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    state = _TrainingState(
        epoch=meta["epoch"],
        best_epoch=meta["best_epoch"],
        best_score=meta["best_score"],
        best_loss=meta["best_loss"],
        since_best=meta["since_best"],
        stopped_early=meta["stopped_early"],
        history=meta["history"],
    )
    return state, best


def resumable_checkpoint(workdir: Path, config: TrainConfig) -> dict[str, Any]:
    """The state of the checkpoint in ``workdir`` (``checkpoint.json``), when ``config`` can resume
    it; read before the dataset is, so that a ``--resume`` with nothing to resume, or with other
    settings, is refused before the hours of hashing ChestX-ray14, not after them. Raises
    ``FileNotFoundError`` (no checkpoint) or ``ValueError`` (a torn one, one of other settings)."""
    weights, state_file = workdir / CHECKPOINT_WEIGHTS, workdir / CHECKPOINT_STATE
    if not weights.is_file() or not state_file.is_file():
        raise FileNotFoundError(
            f"no checkpoint to resume from in {workdir} ({CHECKPOINT_WEIGHTS} + {CHECKPOINT_STATE})"
        )
    meta: dict[str, Any] = json.loads(state_file.read_text(encoding="utf-8"))
    weights_epoch = _weights_epoch(weights)
    if weights_epoch != meta.get("epoch"):  # stopped between the two files: neither epoch is whole
        raise ValueError(
            f"the checkpoint in {workdir} is torn: its weights are of epoch {weights_epoch}, its state "
            f"of epoch {meta.get('epoch')} (stopped while it was written); train again without --resume"
        )
    saved = {k: v for k, v in meta["config"].items() if k not in ("epochs", "patience", "device", "num_workers")}
    if saved.get("seed", config.seed) != config.seed:  # another seed gives another split: say which
        raise ValueError(
            f"the checkpoint in {workdir} was made with --seed {saved['seed']}, not {config.seed}; cannot resume"
        )
    current = {k: v for k, v in config.as_dict().items() if k in saved}
    if saved.get("processes", config.processes) != config.processes:
        made_by = saved["processes"]
        raise ValueError(
            f"the checkpoint in {workdir} was made by {made_by} process(es) (a global batch of "
            f"{made_by * config.batch_size}), this run has {config.processes}: resume it as it was launched"
            + (f", under torchrun --nproc-per-node {made_by}" if made_by > 1 else ", without torchrun")
        )
    if json.loads(json.dumps(current)) != saved:
        changed = sorted(k for k in saved if json.loads(json.dumps(current.get(k))) != saved[k])
        raise ValueError(
            f"the checkpoint in {workdir} was made with other settings ({', '.join(changed)}); cannot resume"
        )
    return meta
