"""Property tests of the manifest parser: random manifests either parse as a plain oracle predicts or
raise DataError, never anything else."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from data_helpers import copy, gi_images
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mics.data import DataError, ImageSet, discover

NAMES = "abcdefghij"
GOOD = {f"imgs/{n}.jpg": f"imgs/{n}.jpg" for n in NAMES} | {
    "./imgs/a.jpg": "imgs/a.jpg",
    "imgs/../imgs/b.jpg": "imgs/b.jpg",
}
BAD = ["imgs/missing.jpg", "../outside.jpg", "OUTSIDE_ABS", "imgs", "imgs/../../outside.jpg"]
PROFILE = settings(
    max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    top = tmp_path_factory.mktemp("manifest-prop")
    folder = top / "data"
    for name, src in zip(NAMES, gi_images("polyps", len(NAMES)), strict=True):
        copy(src, folder / "imgs" / f"{name}.jpg")
    copy(gi_images("normal-cecum", 1)[0], top / "outside.jpg")
    return folder.resolve()


def _raw(path: str, base: Path) -> str:
    return str(base.parent / "outside.jpg") if path == "OUTSIDE_ABS" else path


# mostly valid values, so that both outcomes are common (hypothesis samples list entries uniformly)
paths = st.sampled_from(list(GOOD) * 8 + BAD + ["", "  "])
partners = st.sampled_from(list(GOOD) + BAD + [""] * 30)
labels = st.one_of(st.sampled_from(["BCC", " MEL ", "NV", "BCC", "NV"] * 4 + ["", "  "]), st.text(max_size=4))
groups = st.one_of(st.just(""), st.text(max_size=4))
rows = st.lists(st.tuples(paths, partners, labels, groups), max_size=4)


def _oracle(data: list[tuple[str, str, str, str]]) -> list[tuple[str, str | None, str, str]] | None:
    """Expected (path_a, path_b, label, group) per kept row, or None when the manifest is invalid."""
    out, used = [], set()
    for a, b, label, group in data:
        if not any(x.strip() for x in (a, b, label, group)):
            continue
        if "\x00" in "".join((a, b, label, group)) or not label.strip() or not a.strip():
            return None
        mapped = []
        for p in (a.strip(), b.strip()):
            if p == "":
                mapped.append(None)
            elif p in GOOD and GOOD[p] not in used:
                used.add(GOOD[p])
                mapped.append(GOOD[p])
            else:
                return None
        out.append((mapped[0], mapped[1], label.strip(), group.strip()))
    return out or None


@PROFILE
@given(rows)
def test_structured_manifests_match_oracle(base: Path, data: list[tuple[str, str, str, str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image_a", "image_b", "label", "group"])
    writer.writerows([_raw(a, base), _raw(b, base), label, group] for a, b, label, group in data)
    (base / "manifest.csv").write_text(buffer.getvalue(), encoding="utf-8")
    expected = _oracle(data)
    event("invalid" if expected is None else "valid")
    if expected is None:
        with pytest.raises(DataError):
            discover(base)
        return
    images = discover(base)
    classes = sorted({e[2] for e in expected})
    assert list(images.classes) == classes
    got = sorted(
        (
            images.relpath(s.path_a),
            None if s.path_b is None else images.relpath(s.path_b),
            images.classes[s.label],
        )
        for s in images.samples
    )
    assert got == sorted((a, b, label) for a, b, label, _ in expected)
    given_groups = {a: g for a, _, _, g in expected if g}
    for s in images.samples:
        rel = images.relpath(s.path_a)
        if rel in given_groups:
            assert s.group == given_groups[rel]
        assert s.path_a.is_file() and s.path_a.is_relative_to(base)


@PROFILE
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_arbitrary_text_parses_or_raises_data_error(base: Path, text: str) -> None:
    (base / "manifest.csv").write_text(
        "image_a,image_b,label,group\n" + text, encoding="utf-8", errors="replace"
    )
    _parse_or_data_error(base)
    (base / "manifest.csv").write_bytes(text.encode("utf-8", errors="replace"))
    _parse_or_data_error(base)


def _parse_or_data_error(base: Path) -> None:
    try:
        images = discover(base)
    except DataError:
        return
    assert isinstance(images, ImageSet) and len(images) > 0
    for s in images.samples:
        assert s.path_a.is_file() and s.path_a.is_relative_to(base)
        assert s.path_b is None or s.path_b.is_relative_to(base)
