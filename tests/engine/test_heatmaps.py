"""Heatmaps against pytorch-grad-cam's GradCAM, on real (randomly initialised) networks, on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from meddaemon.engine import heatmaps
from meddaemon.engine.architectures import ClassifierNet, build_model
from meddaemon.engine.heatmap_grid import expand
from meddaemon.engine.heatmaps import (
    HeatmapBatch,
    compute_heatmaps,
    labels_over,
    positive_class,
    predicted_class,
)

TOLERANCE = 1e-4

_MODELS: dict[tuple[str, int, int], ClassifierNet] = {}


def model_for(architecture: str, in_channels: int, num_outputs: int) -> ClassifierNet:
    """Built once per session (VGG16 alone is 138M parameters), seeded, in eval mode."""
    key = (architecture, in_channels, num_outputs)
    if key not in _MODELS:
        torch.manual_seed(1234)
        _MODELS[key] = build_model(architecture, in_channels, num_outputs).eval()
    model = _MODELS[key]
    model.zero_grad(set_to_none=True)
    return model


def images(batch: int, channels: int, height: int = 96, width: int = 96, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))


def gradcam_reference(model: ClassifierNet, x: torch.Tensor, targets: list[list[int]]) -> list[np.ndarray]:
    """pytorch-grad-cam's maps for every (image, class) pair, image-major, one batched call.

    The target layer is the last module of ``model.features`` (for densenet121 the explicit,
    non-in-place ReLU), whose output is the activation ``compute_heatmaps`` uses."""
    img = [i for i, row in enumerate(targets) for _ in row]
    cls = [c for row in targets for c in row]
    with GradCAM(model=model, target_layers=[model.features[-1]]) as cam:
        maps = cam(input_tensor=x[img], targets=[ClassifierOutputTarget(c) for c in cls])
    model.zero_grad(set_to_none=True)
    return list(maps)


def assert_matches_gradcam(model: ClassifierNet, x: torch.Tensor, result: HeatmapBatch) -> int:
    """Same classes as asked, maps (the grids expanded to the input's size) within 1e-4 of GradCAM's
    with the same hottest pixel. Returns how many reference maps were non-constant (so a test can
    insist it compared something)."""
    targets = [[c for c, _ in row] for row in result.maps]
    reference = gradcam_reference(model, x, targets)
    ours = [m for row in result.expanded() for _, m in row]
    assert len(ours) == len(reference)
    informative = 0
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine.shape == theirs.shape == tuple(x.shape[2:])
        assert mine.dtype == np.float32
        assert float(np.abs(mine - theirs).max()) <= TOLERANCE
        assert np.unravel_index(mine.argmax(), mine.shape) == np.unravel_index(theirs.argmax(), theirs.shape)
        informative += int(theirs.max() - theirs.min() > 0.5)
    return informative


def assert_valid_maps(result: HeatmapBatch, x: torch.Tensor) -> None:
    """Grids on the activation's cells, smaller than the input; maps of the input's size from them."""
    assert result.logits.shape[0] == x.shape[0]
    assert not result.logits.requires_grad
    assert len(result.maps) == x.shape[0]
    assert result.size == tuple(x.shape[2:])
    for row, expanded in zip(result.maps, result.expanded(), strict=True):
        for (c, grid), (_, m) in zip(row, expanded, strict=True):
            assert isinstance(c, int)
            assert isinstance(grid, np.ndarray)
            assert grid.dtype == m.dtype == np.float32
            assert grid.ndim == 2 and grid.shape[0] < x.shape[2] and grid.shape[1] < x.shape[3]
            assert m.shape == tuple(x.shape[2:])
            for values in (grid, m):
                assert float(values.min()) >= 0.0
                assert float(values.max()) <= 1.0


# --- parity with pytorch-grad-cam -----------------------------------------------------------------


PARITY = [
    ("small_cnn", 1),
    ("resnet18", 1),
    ("resnet18", 3),
    ("mobilenet_v2", 1),
    ("densenet121", 1),
    ("densenet121", 3),
    ("efficientnet_v2_s", 3),
    ("vgg16", 1),
]


@pytest.mark.parametrize(("architecture", "in_channels"), PARITY)
def test_matches_gradcam_single_image_and_batch(architecture: str, in_channels: int) -> None:
    model = model_for(architecture, in_channels, 3)
    assert (model.cam_linear is None) == (architecture == "vgg16")
    informative = 0
    for batch, seed in ((1, 1), (3, 2)):
        x = images(batch, in_channels, seed=seed)
        # every class of every image: the predicted one and the others
        result = compute_heatmaps(model, x, lambda logits: [[0, 1, 2] for _ in range(logits.shape[0])])
        assert_valid_maps(result, x)
        informative += assert_matches_gradcam(model, x, result)
        with torch.no_grad():
            torch.testing.assert_close(result.logits, model(x), rtol=1e-5, atol=1e-5)
    assert informative >= 2  # not only all-zero maps compared


@pytest.mark.parametrize("architecture", ["resnet18", "vgg16"])
def test_matches_gradcam_non_square_input(architecture: str) -> None:
    """H != W: the resize's (width, height) order in cv2 against ours."""
    model = model_for(architecture, 1, 3)
    x = images(2, 1, height=128, width=96, seed=3)
    result = compute_heatmaps(model, x, predicted_class())
    assert result.maps[0][0][1].shape == (4, 3)  # resnet18's stride of 32
    assert result.expanded()[0][0][1].shape == (128, 96)
    assert_matches_gradcam(model, x, result)


def test_postprocessing_equals_scale_cam_image() -> None:
    """ReLU, min-max (the grid), cv2 bilinear resize, min-max again (``heatmap_grid.expand``): as
    BaseCAM does, on raw maps of odd sizes."""
    generator = torch.Generator().manual_seed(5)
    for h, w, out_h, out_w in ((7, 7, 224, 224), (3, 5, 96, 160), (4, 4, 64, 64), (10, 6, 37, 23)):
        raw = torch.randn(4, h, w, generator=generator)
        raw[0] = -raw[0].abs()  # an all-negative map becomes all zeros
        ours = expand(heatmaps._grids(raw).numpy(), (out_h, out_w))
        reference = scale_cam_image(np.maximum(raw.numpy(), 0), (out_w, out_h))
        reference = scale_cam_image(np.maximum(reference, 0))
        assert ours.shape == reference.shape == (4, out_h, out_w)
        assert float(np.abs(ours - reference).max()) <= 1e-5
        assert not ours[0].any()


# --- choosers ---------------------------------------------------------------------------------------


def test_predicted_class_chooser() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]])
    assert predicted_class()(logits) == [[1], [0]]


def test_positive_class_chooser_one_and_two_logits() -> None:
    assert positive_class()(torch.randn(3, 1)) == [[0], [0], [0]]
    assert positive_class()(torch.randn(2, 2)) == [[1], [1]]
    assert positive_class(index=0)(torch.randn(2, 2)) == [[0], [0]]
    with pytest.raises(ValueError, match="1 or 2 logits"):
        positive_class()(torch.randn(2, 3))
    with pytest.raises(ValueError, match="out of range"):
        positive_class(index=1)(torch.randn(2, 1))


def test_labels_over_chooser_none_one_several() -> None:
    probs = torch.tensor(
        [
            [0.10, 0.20, 0.30, 0.05],  # none over
            [0.10, 0.80, 0.30, 0.05],  # one
            [0.90, 0.60, 0.70, 0.05],  # several
            [0.50, 0.50, 0.40, 0.95],  # exactly at the threshold counts
        ]
    )
    logits = torch.logit(probs.double()).float()
    thresholds = [0.5, 0.5, 0.4, 0.9]
    chosen = labels_over(thresholds)(logits)
    assert chosen[0] == []
    assert chosen[1] == [1]
    assert chosen[2] == [0, 1, 2]
    assert chosen[3][-1] == 3
    assert labels_over(0.5)(logits)[2] == [0, 1, 2]
    with pytest.raises(ValueError, match="thresholds"):
        labels_over([0.5, 0.5])(logits)


@pytest.mark.parametrize("num_outputs", [1, 2])
def test_binary_positive_class_maps(num_outputs: int) -> None:
    model = model_for("mobilenet_v2", 1, num_outputs)
    x = images(3, 1, seed=7)
    result = compute_heatmaps(model, x, positive_class())
    assert result.logits.shape == (3, num_outputs)
    assert [[c for c, _ in row] for row in result.maps] == [[num_outputs - 1]] * 3
    assert_valid_maps(result, x)
    assert assert_matches_gradcam(model, x, result) >= 1


@pytest.mark.parametrize("architecture", ["densenet121", "vgg16"])
def test_multilabel_zero_one_and_several_maps_per_image(architecture: str) -> None:
    model = model_for(architecture, 1, 5)
    x = images(4, 1, seed=11)
    wanted = [[], [3], [0, 2, 4], [4, 1]]
    result = compute_heatmaps(model, x, lambda logits: wanted)
    assert [[c for c, _ in row] for row in result.maps] == wanted
    assert_valid_maps(result, x)
    assert assert_matches_gradcam(model, x, result) >= 2


@pytest.mark.parametrize("architecture", ["densenet121", "vgg16"])
def test_multilabel_labels_over_end_to_end(architecture: str) -> None:
    model = model_for(architecture, 1, 5)
    x = images(3, 1, seed=13)
    with torch.no_grad():
        probs = torch.sigmoid(model(x))
    thresholds = probs.median(dim=0).values.tolist()  # about half of the labels over, per image varying
    result = compute_heatmaps(model, x, labels_over(thresholds))
    expected = [[j for j in range(5) if probs[i, j] >= thresholds[j]] for i in range(3)]
    assert [[c for c, _ in row] for row in result.maps] == expected
    assert_matches_gradcam(model, x, result)


@pytest.mark.parametrize("architecture", ["resnet18", "vgg16"])
def test_nothing_chosen_gives_no_maps(architecture: str) -> None:
    model = model_for(architecture, 1, 3)
    x = images(2, 1)
    result = compute_heatmaps(model, x, lambda logits: [[], []])
    assert result.maps == [[], []]
    assert result.logits.shape == (2, 3)


# --- cost: no backward on the CAM path, head-only gradients on the other -----------------------------


def test_cam_path_runs_no_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    model = model_for("densenet121", 1, 4)
    x = images(2, 1, seed=17)
    expected = compute_heatmaps(model, x, labels_over(0.0))

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the CAM path must not run a backward pass")

    monkeypatch.setattr(torch.autograd, "grad", refuse)
    monkeypatch.setattr(torch.autograd, "backward", refuse)
    monkeypatch.setattr(torch.Tensor, "backward", refuse)
    seen: list[tuple[bool, bool]] = []
    hook = model.features.register_forward_hook(
        lambda module, args, output: seen.append((torch.is_grad_enabled(), output.requires_grad))
    )
    try:
        result = compute_heatmaps(model, x, labels_over(0.0))
        with torch.inference_mode():
            in_inference = compute_heatmaps(model, x, labels_over(0.0))
    finally:
        hook.remove()
    assert seen == [(False, False), (False, False)]  # no graph recorded at all
    assert all(p.grad is None for p in model.parameters())
    for got in (result, in_inference):
        for row_a, row_b in zip(got.maps, expected.maps, strict=True):
            for (ca, ma), (cb, mb) in zip(row_a, row_b, strict=True):
                assert ca == cb
                np.testing.assert_array_equal(ma, mb)


def test_gradient_path_differentiates_the_head_only(monkeypatch: pytest.MonkeyPatch) -> None:
    model = model_for("vgg16", 1, 3)
    x = images(3, 1, seed=19)
    expected = compute_heatmaps(model, x, lambda logits: [[0, 2], [1], []])

    inputs_seen: list[tuple[tuple[int, ...], ...]] = []
    real_grad = torch.autograd.grad

    def spy(outputs: object, inputs: object, *args: object, **kwargs: object) -> object:
        tensors = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)  # type: ignore[arg-type]
        inputs_seen.append(tuple(tuple(t.shape) for t in tensors))
        return real_grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    features_grad: list[bool] = []
    hook = model.features.register_forward_hook(lambda m, a, output: features_grad.append(output.requires_grad))
    try:
        with torch.inference_mode():
            got = compute_heatmaps(model, x, lambda logits: [[0, 2], [1], []])
    finally:
        hook.remove()
    # two target ranks -> two calls, each with respect to the activation (B, 512, 3, 3) alone
    assert inputs_seen == [((3, 512, 3, 3),), ((3, 512, 3, 3),)]
    assert features_grad == [False]  # the backbone ran without a graph
    assert all(p.grad is None for p in model.parameters())
    for row_a, row_b in zip(got.maps, expected.maps, strict=True):
        for (ca, ma), (cb, mb) in zip(row_a, row_b, strict=True):
            assert ca == cb
            np.testing.assert_allclose(ma, mb, atol=1e-6)


# --- contract ---------------------------------------------------------------------------------------


def test_refuses_train_mode_bad_shapes_and_bad_choosers() -> None:
    model = model_for("resnet18", 1, 3)
    x = images(2, 1)
    with pytest.raises(ValueError, match="target lists for"):
        compute_heatmaps(model, x, lambda logits: [[0]])
    with pytest.raises(ValueError, match="out of range"):
        compute_heatmaps(model, x, lambda logits: [[0], [3]])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        compute_heatmaps(model, x[0], predicted_class())
    model.train()
    try:
        with pytest.raises(ValueError, match="eval"):
            compute_heatmaps(model, x, predicted_class())
    finally:
        model.eval()


def test_works_under_autocast() -> None:
    """The daemon runs the forward under autocast on CUDA; CPU bf16 autocast stands in for it here."""
    model = model_for("resnet18", 1, 3)
    x = images(2, 1, seed=23)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        result = compute_heatmaps(model, x, predicted_class())
    assert_valid_maps(result, x)
    assert all(float(m.max()) > 0.5 for row in result.maps for _, m in row)


def test_the_overlay_blends_jet_colours_by_the_square_root_of_the_map_within_two_levels():
    """The overlay the daemon writes for every heatmap is computed from tables in fixed point (issue
    16); it stays within two levels (of 255) of the exact blend, and a cold pixel keeps the scan's."""
    from meddaemon.engine.overlay import jet, overlay

    rng = np.random.default_rng(16)
    view = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    heatmap = rng.random((40, 56), dtype=np.float32)
    heatmap[0, 0], heatmap[0, 1] = 0.0, 1.0
    weight = 0.45 * np.sqrt(heatmap)[..., None]
    exact = view * (1 - weight) + jet(heatmap).astype(np.float32) * weight

    blended = overlay(view, heatmap)

    assert blended.dtype == np.uint8 and blended.shape == view.shape
    assert np.abs(blended.astype(np.float32) - exact).max() <= 2.0
    assert (blended[0, 0] == view[0, 0]).all()


def test_an_overlay_over_a_grey_view_is_its_overlay_over_the_view_in_colour_byte_for_byte():
    """A grey model's view is kept as one channel and blended through one table of every grey level
    and map level (issue 16); every pair gives the three-channel blend's bytes exactly, and a map
    beyond [0, 1] is clipped the same way."""
    from meddaemon.engine.overlay import LEVELS, overlay

    grey = np.tile(np.arange(256, dtype=np.uint8), (LEVELS + 2, 1))
    heatmap = np.repeat(np.linspace(0.0, 1.0, LEVELS, dtype=np.float32), 256).reshape(LEVELS, 256)
    heatmap = np.vstack([heatmap, np.full((1, 256), -0.5, np.float32), np.full((1, 256), 1.5, np.float32)])

    blended = overlay(grey, heatmap)

    assert blended.dtype == np.uint8 and blended.shape == (LEVELS + 2, 256, 3)
    assert (blended == overlay(np.repeat(grey[..., None], 3, axis=2), heatmap)).all()


@pytest.mark.parametrize("channels", [1, 3])
def test_the_model_s_pixels_are_its_view_in_the_model_s_own_channels(channels: int):
    from meddaemon.engine.overlay import model_pixels, model_view
    from meddaemon.engine.tasks import GREY_MEAN, GREY_STD, IMAGENET_MEAN, IMAGENET_STD, InputContract

    mean, std = (GREY_MEAN, GREY_STD) if channels == 1 else (IMAGENET_MEAN, IMAGENET_STD)
    contract = InputContract(channels, 24, 20, mean, std)
    model_input = np.random.default_rng(channels).normal(0.0, 1.5, (channels, 24, 20)).astype(np.float32)

    pixels = model_pixels(model_input, contract)
    view = model_view(model_input, contract)

    assert view.shape == (24, 20, 3) and pixels.shape == ((24, 20) if channels == 1 else (24, 20, 3))
    assert (view == (pixels[..., None] if channels == 1 else pixels)).all()
    assert pixels.min() == 0 and pixels.max() == 255  # clipped to the picture's range


def test_the_view_of_a_model_normalising_each_image_by_its_own_statistics_is_the_image_grey_as_it_was():
    """A Keras import normalises per image and keeps ImageNet's mean and std in its contract: the
    view undid the per-channel ImageNet statistics the model never used, and a grey scan came out
    tinted, with the contrast of ImageNet's std."""
    from meddaemon.engine.overlay import model_pixels
    from meddaemon.engine.preprocess import normalise
    from meddaemon.engine.tasks import IMAGENET_MEAN, IMAGENET_STD, InputContract

    contract = InputContract(3, 24, 20, IMAGENET_MEAN, IMAGENET_STD, normalisation="per_image")
    grey = np.linspace(0.0, 1.0, 24 * 20, dtype=np.float32).reshape(24, 20)  # SYNTHETIC: a ramp over the range
    model_input = normalise(np.repeat(grey[None, None], 3, axis=1), contract)[0]

    pixels = model_pixels(model_input, contract)

    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert np.abs(pixels[..., 0].astype(np.int16) - np.round(grey * 255)).max() <= 1


def test_a_map_that_is_not_finite_is_left_out_not_stored_and_the_others_kept():
    """Features or gradients with a NaN gave a NaN map, stored and drawn as though it were one."""
    activation = torch.rand(2, 4, 7, 7, generator=torch.Generator().manual_seed(3))
    activation[0, 1, 2, 2] = float("nan")
    logits = torch.tensor([[2.0, -1.0], [2.0, -1.0]])
    weight = torch.ones(2, 4)

    result = heatmaps.cams_from_features(activation, logits, weight, predicted_class(), (56, 56))

    assert [len(row) for row in result.maps] == [0, 1]
    assert all(np.isfinite(m).all() for row in result.maps for _, m in row)


@pytest.mark.parametrize("channels", [1, 3], ids=["grey view", "colour view"])
def test_an_overlay_of_a_map_with_nan_draws_no_heat_there_and_does_not_fail(channels: int):
    from meddaemon.engine.overlay import overlay

    view = np.full((8, 8, 3) if channels == 3 else (8, 8), 128, np.uint8)
    heatmap = np.full((8, 8), np.nan, np.float32)
    heatmap[0, 0] = 1.0

    blended = overlay(view, heatmap)

    assert (blended[1:, 1:] == 128).all() and (blended[0, 0] != 128).any()
