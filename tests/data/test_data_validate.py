"""load_rgb / check_image / validate: odd-but-valid images converted, broken ones named and dropped."""

from __future__ import annotations

import csv
import io
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from data_helpers import MILK, copy, gi_images, milk_lesions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mics.data import DataError, Dropped, check_image, discover, load_rgb, validate, write_dropped

REAL = gi_images("polyps", 1)[0]


def _real(size: tuple[int, int] = (48, 32)) -> Image.Image:
    return Image.open(REAL).convert("RGB").resize(size)


def _rgb(path: Path) -> np.ndarray:
    image = load_rgb(path)
    assert image.mode == "RGB"
    return np.asarray(image)


# ---------------------------------------------------------------- odd but valid images


def test_plain_rgb_jpeg_matches_pil(tmp_path: Path) -> None:
    np.testing.assert_array_equal(_rgb(REAL), np.asarray(Image.open(REAL)))


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    gray = np.arange(32 * 48, dtype=np.uint8).reshape(32, 48)
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = _rgb(tmp_path / "g.png")
    assert out.shape == (32, 48, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_one_bit_image(tmp_path: Path) -> None:
    Image.fromarray(np.eye(20, dtype=bool)).save(tmp_path / "b.png")
    out = _rgb(tmp_path / "b.png")
    assert out[3, 3].tolist() == [255, 255, 255] and out[3, 4].tolist() == [0, 0, 0]


def test_rgba_is_composited_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[...] = (200, 100, 50, 255)
    rgba[:10, :, 3] = 128
    rgba[:5, :, 3] = 0
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = _rgb(tmp_path / "a.png").astype(int)
    assert out[15, 0].tolist() == [200, 100, 50]
    assert out[0, 0].tolist() == [0, 0, 0]
    expected = [round(v * 128 / 255) for v in (200, 100, 50)]
    assert np.abs(out[7, 0] - expected).max() <= 1


def test_la_image(tmp_path: Path) -> None:
    la = np.stack([np.full((16, 16), 200, np.uint8), np.full((16, 16), 255, np.uint8)], -1)
    la[:8, :, 1] = 0
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    out = _rgb(tmp_path / "la.png")
    assert out[12, 0].tolist() == [200, 200, 200] and out[0, 0].tolist() == [0, 0, 0]


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    pal = _real().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(_rgb(tmp_path / "p.png"), np.asarray(pal.convert("RGB")))
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pt.png", transparency=0)
    out = _rgb(tmp_path / "pt.png")
    index = np.asarray(pal)
    assert (out[index == 0] == 0).all()
    np.testing.assert_array_equal(out[index != 0], np.asarray(pal.convert("RGB"))[index != 0])


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = _rgb(tmp_path / "deep.png")
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]


def test_float_tiff(tmp_path: Path) -> None:
    values = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    out = _rgb(tmp_path / "f.tif")
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255


def test_cmyk_jpeg_converted_close_to_original(tmp_path: Path) -> None:
    original = _real((64, 64))
    original.convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    out = _rgb(tmp_path / "cmyk.jpg").astype(int)
    assert np.abs(out - np.asarray(original, dtype=int)).mean() < 8


@pytest.mark.parametrize(
    "orientation, method",
    [(6, Image.Transpose.ROTATE_270), (3, Image.Transpose.ROTATE_180), (8, Image.Transpose.ROTATE_90)],
)
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int, method: Image.Transpose) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    _real((48, 32)).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    stored = Image.open(tmp_path / "rot.jpg").convert("RGB")
    out = _rgb(tmp_path / "rot.jpg")
    np.testing.assert_array_equal(out, np.asarray(stored.transpose(method)))
    assert check_image(tmp_path / "rot.jpg", min_size=40) == (
        "too small (32x48 px, need at least 40 px on each side)"
        if orientation in (6, 8)
        else "too small (48x32 px, need at least 40 px on each side)"
    )


@pytest.mark.parametrize("fmt", ["png", "bmp", "tiff", "webp"])
def test_other_formats(tmp_path: Path, fmt: str) -> None:
    _real().save(tmp_path / f"x.{fmt}", **({"lossless": True} if fmt == "webp" else {}))
    np.testing.assert_array_equal(_rgb(tmp_path / f"x.{fmt}"), np.asarray(_real()))


def test_png_named_jpg_is_fine(tmp_path: Path) -> None:
    _real().save(tmp_path / "liar.jpg", format="PNG")
    assert check_image(tmp_path / "liar.jpg") is None


def test_draft_keeps_at_least_the_requested_size() -> None:
    big = Image.open(MILK / "BCC" / f"{milk_lesions('BCC', 1)[0]}__clinical.jpg")
    small = load_rgb(MILK / "BCC" / f"{milk_lesions('BCC', 1)[0]}__clinical.jpg", draft_size=40)
    assert min(small.size) >= 40 and small.size[0] <= big.size[0]


# ---------------------------------------------------------------- broken files


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _broken(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.jpg"
    data = REAL.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("this is a text file, not a JPEG\n")
    elif kind == "tiny":
        _real((8, 8)).save(path)
    elif kind in ("bomb", "huge"):
        # header-only PNGs claiming 10^10 pixels (PIL refuses) or 9000^2 (PIL warns, mics refuses)
        path = tmp_path / f"{kind}.png"
        side = 100_000 if kind == "bomb" else 9000
        header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
        path.write_bytes(
            b"\x89PNG\r\n\x1a\n"
            + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(b"\0"))
            + _chunk(b"IEND", b"")
        )
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(
    "kind, reason",
    [
        ("empty", "empty file"),
        ("truncated", "corrupt or truncated"),
        ("text", "not an image"),
        ("bomb", "too large"),
        ("huge", "too large"),
    ],
)
def test_broken_files_raise_data_error_naming_the_file(tmp_path: Path, kind: str, reason: str) -> None:
    path = _broken(tmp_path, kind)
    with pytest.raises(DataError, match=reason) as err:
        load_rgb(path)
    assert str(path) in str(err.value)
    assert reason in (check_image(path) or "")


def test_missing_file(tmp_path: Path) -> None:
    assert check_image(tmp_path / "ghost.jpg") == "file not found"
    with pytest.raises(DataError, match="ghost.jpg: file not found"):
        load_rgb(tmp_path / "ghost.jpg")


def test_too_small_is_reported_by_check_not_by_load(tmp_path: Path) -> None:
    path = _broken(tmp_path, "tiny")
    assert load_rgb(path).size == (8, 8)
    assert check_image(path) == "too small (8x8 px, need at least 16 px on each side)"
    assert check_image(path, min_size=8) is None


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=2048))
def test_random_bytes_never_escape_as_other_errors(data: bytes) -> None:
    _assert_data_error_or_rgb(data)


JPEG_BYTES = REAL.read_bytes()
PNG_BUFFER = io.BytesIO()
_real((24, 24)).save(PNG_BUFFER, format="PNG")
PNG_BYTES = PNG_BUFFER.getvalue()


@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([JPEG_BYTES, PNG_BYTES]),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
    st.integers(0, 10**6),
)
def test_mutated_real_images_never_escape(base: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(base[: max(1, cut % (len(base) + 1))])
    for pos, value in flips:
        data[pos % len(data)] = value
    _assert_data_error_or_rgb(bytes(data))


def _assert_data_error_or_rgb(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "random.jpg"
        path.write_bytes(data)
        try:
            image = load_rgb(path)
        except DataError as err:
            assert str(path) in str(err)
            return
        assert image.mode == "RGB" and min(image.size) >= 1
        assert np.asarray(image).dtype == np.uint8


# ---------------------------------------------------------------- validate()


@pytest.fixture
def broken_tree(class_tree: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    bad = []
    for kind, cls in (("empty", "polyps"), ("truncated", "normal-cecum"), ("text", "polyps")):
        bad.append(copy(_broken(tmp_path, kind), class_tree / cls / f"zz_{kind}.jpg"))
    return class_tree, bad


def test_validate_clean_data_returns_it_unchanged(class_tree: Path) -> None:
    images = discover(class_tree)
    kept, dropped = validate(images, progress=True)
    assert kept == images and dropped == []


def test_validate_refuses_bad_files_listing_them(broken_tree: tuple[Path, list[Path]]) -> None:
    root, bad = broken_tree
    with pytest.raises(DataError, match="pass --skip-bad") as err:
        validate(discover(root), progress=False)
    message = str(err.value)
    assert "3 of 15 image files" in message
    for path in bad:
        assert str(path) in message


def test_validate_lists_only_the_first_few(class_tree: Path, tmp_path: Path) -> None:
    for k in range(7):
        (class_tree / "polyps" / f"empty{k}.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"\.\.\. and 2 more"):
        validate(discover(class_tree), progress=False)


def test_validate_skip_bad_drops_and_reports(broken_tree: tuple[Path, list[Path]]) -> None:
    root, bad = broken_tree
    kept, dropped = validate(discover(root), skip_bad=True, progress=False)
    assert len(kept) == 12
    assert sorted(d.path for d in dropped) == sorted(bad)
    assert {d.path.name: d.reason for d in dropped}["zz_empty.jpg"] == "empty file (0 bytes)"
    assert not {s.path_a for s in kept.samples} & set(bad)


def test_validate_skip_bad_drops_whole_pair(suffix_tree: Path) -> None:
    ident = milk_lesions("MEL", 1)[0]
    partner = suffix_tree / "MEL" / f"{ident}__dermoscopic.jpg"
    partner.write_bytes(partner.read_bytes()[:300])
    kept, dropped = validate(discover(suffix_tree), skip_bad=True, min_per_class=4, progress=False)
    assert len(kept) == 14 and [d.path for d in dropped] == [partner]
    assert ident not in kept.groups()


def test_validate_min_size(class_tree: Path, tmp_path: Path) -> None:
    copy(_broken(tmp_path, "tiny"), class_tree / "polyps" / "tiny.jpg")
    with pytest.raises(DataError, match="tiny.jpg: too small"):
        validate(discover(class_tree), progress=False)
    kept, _ = validate(discover(class_tree), min_size=8, progress=False)
    assert len(kept) == 13


def test_class_too_small_for_split(make_tree) -> None:  # type: ignore[no-untyped-def]
    root = make_tree({"big": 6, "small": 3})
    with pytest.raises(DataError, match="class 'small' has 3 usable sample") as err:
        validate(discover(root), progress=False)
    assert "at least 5" in str(err.value) and "6:2:2" in str(err.value)
    kept, _ = validate(discover(root), min_per_class=3, progress=False)
    assert len(kept) == 9


def test_class_too_small_after_dropping(make_tree) -> None:  # type: ignore[no-untyped-def]
    root = make_tree({"a": 6, "b": 5})
    (root / "b" / sorted(p.name for p in (root / "b").iterdir())[0]).write_bytes(b"")
    with pytest.raises(DataError, match="class 'b' has 4 usable sample.*after dropping bad files"):
        validate(discover(root), skip_bad=True, progress=False)


def test_write_dropped_roundtrip(tmp_path: Path) -> None:
    dropped = [
        Dropped(tmp_path / "a, b.jpg", "empty file (0 bytes)"),
        Dropped(tmp_path / "c.jpg", 'odd "quote"'),
    ]
    out = tmp_path / "report" / "dropped.csv"
    write_dropped(dropped, out)
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows == [
        ["path", "reason"],
        [str(tmp_path / "a, b.jpg"), "empty file (0 bytes)"],
        [str(tmp_path / "c.jpg"), 'odd "quote"'],
    ]
