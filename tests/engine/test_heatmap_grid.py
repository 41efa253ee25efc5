"""A map is kept as its grid and read at the model input's size (``engine.heatmap_grid``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from meddaemon.engine.heatmap_grid import expand, expand_one, grid_bytes, map_is_flat, read_map


def torch_expand(grids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's second step written with torch: bilinear resize, ReLU, min-max."""
    m = F.interpolate(torch.from_numpy(grids).unsqueeze(1), size=size, mode="bilinear", align_corners=False)
    m = m.squeeze(1).clamp_min(0)
    m = m - m.amin(dim=(1, 2), keepdim=True)
    return (m / (m.amax(dim=(1, 2), keepdim=True) + 1e-7)).numpy()


@pytest.mark.parametrize(
    ("grid", "size"),
    [((7, 7), (224, 224)), ((16, 12), (512, 384)), ((3, 5), (96, 160)), ((10, 6), (37, 23)), ((28, 28), (14, 14))],
)
def test_expanding_a_grid_equals_torchs_bilinear_resize_and_normalisation(
    grid: tuple[int, int], size: tuple[int, int]
) -> None:
    grids = np.random.default_rng(3).random((4, *grid), dtype=np.float32)
    maps = expand(grids, size)
    assert maps.shape == (4, *size) and maps.dtype == np.float32
    np.testing.assert_allclose(maps, torch_expand(grids, size), atol=1e-6)
    assert float(maps.min()) == 0.0 and 0.999 < float(maps.max()) <= 1.0


def test_a_map_already_at_the_size_is_returned_as_it_is() -> None:
    """Maps stored whole, as versions before the grid kept them, read back unchanged."""
    whole = np.random.default_rng(4).random((224, 224), dtype=np.float32)
    np.testing.assert_array_equal(expand_one(whole, (224, 224)), whole)


def test_an_empty_map_stays_empty() -> None:
    assert not expand_one(np.zeros((7, 7), np.float32), (224, 224)).any()


def test_a_map_that_marks_no_part_of_the_image_is_flat_and_one_that_marks_some_is_not(tmp_path: Path) -> None:
    """Zero everywhere (Grad-CAM's ReLU of negative evidence) or one value: read, it is all zeros."""
    flat = [np.zeros((7, 7), np.float32), np.full((7, 7), 0.4, np.float32), -np.ones((7, 7), np.float32)]
    for grid in flat:
        assert map_is_flat(grid_bytes(grid)) and not expand_one(grid, (64, 64)).any()
    marked = np.zeros((7, 7), np.float32)
    marked[3, 4] = 0.01
    assert not map_is_flat(grid_bytes(marked)) and expand_one(marked, (64, 64)).any()
    np.save(tmp_path / "older.npy", np.zeros((224, 224), np.float32))  # an older version's whole map, a file
    assert map_is_flat(tmp_path / "older.npy")
    assert not map_is_flat(b"SYNTHETIC: not a .npy") and not map_is_flat(tmp_path / "gone.npy")
    np.save(tmp_path / "text.npy", np.array(["SYNTHETIC"]), allow_pickle=False)
    assert not map_is_flat(b"") and not map_is_flat(tmp_path / "text.npy")  # damage: EOFError, a type error


def test_a_grid_is_kept_as_the_bytes_np_save_writes(tmp_path: Path) -> None:
    """Whatever array is given (SYNTHETIC): float32, C order, ``np.save``'s bytes, never a pickle."""
    rng = np.random.default_rng(16)
    batch = rng.random((3, 7, 7), dtype=np.float32)
    for grid in (batch[1], rng.random((7, 7)), batch[2].T, np.zeros((0, 7), np.float32)):
        expected = tmp_path / "expected.npy"
        np.save(expected, np.ascontiguousarray(grid, dtype=np.float32), allow_pickle=False)
        assert grid_bytes(grid) == expected.read_bytes()


def test_read_map_reads_a_rows_grid_at_the_size_asked() -> None:
    grid = np.random.default_rng(5).random((7, 7), dtype=np.float32)
    np.testing.assert_array_equal(read_map(grid_bytes(grid), (224, 224)), expand_one(grid, (224, 224)))
    assert len(grid_bytes(grid)) == 128 + 7 * 7 * 4  # the .npy header, then the cells


def test_read_map_reads_an_earlier_versions_npy_file(tmp_path: Path) -> None:
    grid = np.random.default_rng(5).random((7, 7), dtype=np.float32)
    np.save(tmp_path / "v1_benign.npy", grid)
    np.testing.assert_array_equal(read_map(tmp_path / "v1_benign.npy", (224, 224)), expand_one(grid, (224, 224)))


def test_read_map_reads_a_whole_map_of_an_earlier_version_as_it_is(tmp_path: Path) -> None:
    whole = np.random.default_rng(6).random((224, 224), dtype=np.float32)
    np.save(tmp_path / "v1_benign.npy", whole)
    np.testing.assert_array_equal(read_map(tmp_path / "v1_benign.npy", (224, 224)), whole)


def test_read_map_refuses_what_is_not_a_map(tmp_path: Path) -> None:
    np.save(tmp_path / "cube.npy", np.zeros((2, 7, 7), np.float32))
    with pytest.raises(ValueError, match="3-D"):
        read_map(tmp_path / "cube.npy", (224, 224))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        read_map(tmp_path / "objects.npy", (224, 224))
    with pytest.raises(ValueError, match="pickle"):
        read_map((tmp_path / "objects.npy").read_bytes(), (224, 224))
    with pytest.raises(OSError):
        read_map(tmp_path / "missing.npy", (224, 224))


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["NaN", "inf"])
def test_read_map_refuses_a_map_that_is_not_finite(value: float) -> None:
    """A NaN map was drawn as an overlay with no heat at all over a grey view, and crashed the
    drawing over a colour one (IndexError): the report says the overlay is missing instead."""
    grid = np.zeros((7, 7), np.float32)
    grid[3, 3] = value
    with pytest.raises(ValueError, match="not finite"):
        read_map(grid_bytes(grid), (224, 224))
