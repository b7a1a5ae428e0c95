"""load_arrays: pixels match a naive crop+resize, partners come from the generator, the cache is reused."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mics.data.cache as cache
from mics.data import DataError, discover, load_arrays


class Negative:
    """A trivial deterministic generator whose output is easy to predict."""

    name = "negative-test-v1"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3
        return 255 - images


def _naive(path: Path, size: int) -> np.ndarray:
    """Centre square crop by explicit slicing, then PIL bilinear resize: [3, size, size]."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    s = min(w, h)
    cropped = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return np.asarray(cropped.resize((size, size), Image.Resampling.BILINEAR)).transpose(2, 0, 1)


def test_arrays_match_naive_pipeline_and_generator(class_tree: Path, tmp_path: Path) -> None:
    images = discover(class_tree)
    gen = Negative()
    a, b = load_arrays(images, 32, gen, cache_dir=tmp_path / "c", progress=False)
    assert a.shape == b.shape == (12, 3, 32, 32) and a.dtype == b.dtype == np.uint8
    for i, s in enumerate(images.samples):
        # 128 px JPEGs are not DCT-drafted at size 32 (scale 1/4 would give exactly 32: allow that path too)
        diff = np.abs(a[i].astype(int) - _naive(s.path_a, 32).astype(int))
        assert diff.mean() < 3, s.path_a
        np.testing.assert_array_equal(b[i], 255 - a[i])
    assert gen.calls == 1


def test_rectangular_image_is_centre_cropped(tmp_path: Path) -> None:
    root = tmp_path / "rect"
    (root / "x").mkdir(parents=True)
    pixels = np.zeros((20, 60, 3), dtype=np.uint8)
    pixels[:, 20:40] = 255  # the centre square is white, the sides black
    for k in range(3):
        Image.fromarray(pixels).save(root / "x" / f"{k}.png")
    a, _ = load_arrays(discover(root), 10, Negative(), cache_dir=tmp_path / "c", progress=False)
    assert (a == 255).all()


def test_real_pairs_are_loaded_not_generated(suffix_tree: Path, tmp_path: Path) -> None:
    images = discover(suffix_tree)
    gen = Negative()
    a, b = load_arrays(images, 16, gen, cache_dir=tmp_path / "cache", progress=False)
    assert gen.calls == 0
    s = images.samples[4]
    assert s.path_b is not None
    assert np.abs(b[4].astype(int) - _naive(s.path_b, 16).astype(int)).mean() < 3
    assert not np.array_equal(a[4], b[4])


def test_second_call_reuses_cache_without_decoding(
    class_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = discover(class_tree)
    first = load_arrays(images, 24, Negative(), cache_dir=tmp_path / "cache", progress=True)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 2 and all(f.endswith(".npy") for f in files)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded an image although the cache is valid")

    monkeypatch.setattr(cache, "load_rgb", fail)
    gen = Negative()
    second = load_arrays(images, 24, gen, cache_dir=tmp_path / "cache", progress=False)
    assert gen.calls == 0
    assert isinstance(second[0], np.memmap) and not second[0].flags.writeable
    for x, y in zip(first, second, strict=True):
        np.testing.assert_array_equal(x, y)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == files


def test_key_changes_with_size_generator_and_files(class_tree: Path, tmp_path: Path) -> None:
    images = discover(class_tree)
    base = cache.cache_key(images, 32, "g1")
    assert base == cache.cache_key(discover(class_tree), 32, "g1")
    assert base != cache.cache_key(images, 16, "g1")
    assert base != cache.cache_key(images, 32, "g2")
    path = images.samples[0].path_a
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert base != cache.cache_key(images, 32, "g1")


def test_env_var_sets_default_dir(class_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICS_CACHE", str(tmp_path / "env-cache"))
    assert cache.default_cache_dir() == tmp_path / "env-cache"
    load_arrays(discover(class_tree), 8, Negative(), progress=False)
    assert len(list((tmp_path / "env-cache").glob("*.npy"))) == 2


def test_corrupt_cache_file_is_rebuilt(class_tree: Path, tmp_path: Path) -> None:
    images = discover(class_tree)
    a, _ = load_arrays(images, 8, Negative(), cache_dir=tmp_path / "cache", progress=False)
    expected = np.array(a)
    for p in (tmp_path / "cache").glob("*-a.npy"):
        p.write_bytes(b"garbage")
    again, _ = load_arrays(images, 8, Negative(), cache_dir=tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(again, expected)


def test_unwritable_cache_dir_falls_back_to_memory(class_tree: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    a, b = load_arrays(discover(class_tree), 8, Negative(), cache_dir=blocker / "sub", progress=False)
    assert a.shape == (12, 3, 8, 8) and not isinstance(a, np.memmap)
    np.testing.assert_array_equal(b, 255 - a)


def test_bad_image_surfaces_as_data_error_and_leaves_no_temp(class_tree: Path, tmp_path: Path) -> None:
    images = discover(class_tree)
    images.samples[3].path_a.write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        load_arrays(images, 8, Negative(), cache_dir=tmp_path / "cache", progress=False)
    assert list((tmp_path / "cache").iterdir()) == []


def test_generator_with_wrong_output_is_refused(class_tree: Path, tmp_path: Path) -> None:
    class Shrinks:
        name = "bad"

        def __call__(self, images: np.ndarray) -> np.ndarray:
            return images[:, ::2]

    with pytest.raises(ValueError, match="returned"):
        load_arrays(discover(class_tree), 8, Shrinks(), cache_dir=tmp_path / "cache", progress=False)
