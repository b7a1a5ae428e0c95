"""Small data sets in every supported layout, built in tmp_path from the bundled real images."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from data_helpers import MILK, copy, gi_images, milk_lesions


@pytest.fixture
def class_tree(tmp_path: Path) -> Path:
    """``<root>/{normal-cecum,polyps}/*.jpg``, 6 each, plus root files discovery must ignore."""
    root = tmp_path / "gi"
    for cls in ("normal-cecum", "polyps"):
        for p in gi_images(cls, 6):
            copy(p, root / cls / p.name)
    (root / "MANIFEST.csv").write_text("path,class\nx.jpg,polyps\n")
    (root / "README.md").write_text("notes\n")
    (root / "LICENSE").write_text("CC BY 4.0\n")
    (root / "polyps" / "notes.txt").write_text("not an image\n")
    (root / "polyps" / ".DS_Store").write_bytes(b"\0\0")
    (root / "__MACOSX" / "polyps").mkdir(parents=True)
    (root / "__MACOSX" / "polyps" / "._a.jpg").write_bytes(b"\0")
    (root / ".thumbnails").mkdir()
    return root


@pytest.fixture
def suffix_tree(tmp_path: Path) -> Path:
    """MILK10k-style ``<root>/<class>/<id>__clinical.jpg`` + ``__dermoscopic.jpg``, 3 classes x 5 lesions."""
    root = tmp_path / "milk"
    for cls in ("BCC", "MEL", "NV"):
        for ident in milk_lesions(cls, 5):
            for tag in ("clinical", "dermoscopic"):
                copy(MILK / cls / f"{ident}__{tag}.jpg", root / cls / f"{ident}__{tag}.jpg")
    shutil.copyfile(MILK / "MANIFEST.csv", root / "MANIFEST.csv")
    return root


@pytest.fixture
def folders_tree(tmp_path: Path) -> Path:
    """The MICS authors' ``<class>_WLI/x.jpg`` + ``<class>_NBI/x.jpg`` (MILK images stand in)."""
    root = tmp_path / "wlinbi"
    for cls in ("BCC", "NV"):
        for k, ident in enumerate(milk_lesions(cls, 4)):
            copy(MILK / cls / f"{ident}__clinical.jpg", root / f"{cls}_WLI" / f"{k}.jpg")
            copy(MILK / cls / f"{ident}__dermoscopic.jpg", root / f"{cls}_NBI" / f"{k}.jpg")
    return root


@pytest.fixture
def manifest_tree(tmp_path: Path) -> Path:
    """``<root>/manifest.csv`` over images in arbitrary sub-folders; some rows without image_b."""
    root = tmp_path / "man"
    rows = ["image_a,image_b,label,group"]
    for cls in ("BCC", "MEL"):
        for k, ident in enumerate(milk_lesions(cls, 4)):
            a = copy(MILK / cls / f"{ident}__clinical.jpg", root / "imgs" / f"{ident}_c.jpg")
            b = copy(MILK / cls / f"{ident}__dermoscopic.jpg", root / "imgs" / f"{ident}_d.jpg")
            rel_b = b.relative_to(root).as_posix() if k % 2 == 0 else ""
            rows.append(
                f"{a.relative_to(root).as_posix()},{rel_b},{cls},{'patient' + str(k) if k < 2 else ''}"
            )
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


def _kvasir(tmp_path: Path, name: str) -> Path:
    top = tmp_path / "download" / name
    classes = (
        "normal-z-line",
        "normal-pylorus",
        "normal-cecum",
        "esophagitis",
        "polyps",
        "ulcerative-colitis",
        "dyed-lifted-polyps",
        "dyed-resection-margins",
    )
    frames = gi_images("polyps", 16) + gi_images("normal-cecum", 8)
    for c, cls in enumerate(classes):
        for k in range(3):
            copy(frames[c * 3 + k], top / cls / f"{cls}-{k}.jpg")
    return top


@pytest.fixture
def kvasir_v1(tmp_path: Path) -> Path:
    return _kvasir(tmp_path, "kvasir-dataset")


@pytest.fixture
def kvasir_v2(tmp_path: Path) -> Path:
    return _kvasir(tmp_path, "kvasir-dataset-v2")


@pytest.fixture
def hyperkvasir_tree(tmp_path: Path) -> Path:
    """``hyper-kvasir/labeled-images/<tract>/<category>/<label>/*.jpg`` with mapped and ignored labels."""
    top = tmp_path / "hyper-kvasir"
    labels = {
        ("lower-gi-tract", "anatomical-landmarks", "cecum"): 2,
        ("lower-gi-tract", "anatomical-landmarks", "retroflex-rectum"): 1,
        ("lower-gi-tract", "pathological-findings", "polyps"): 2,
        ("lower-gi-tract", "pathological-findings", "ulcerative-colitis-grade-1"): 1,
        ("lower-gi-tract", "pathological-findings", "ulcerative-colitis-grade-2-3"): 1,
        ("upper-gi-tract", "anatomical-landmarks", "pylorus"): 2,
        ("upper-gi-tract", "anatomical-landmarks", "z-line"): 2,
        ("upper-gi-tract", "pathological-findings", "esophagitis-a"): 1,
        ("upper-gi-tract", "pathological-findings", "esophagitis-b-d"): 1,
        ("upper-gi-tract", "pathological-findings", "barretts"): 1,
    }
    frames = iter(gi_images("polyps", 14))
    for (tract, category, label), n in labels.items():
        for _ in range(n):
            src = next(frames)
            copy(src, top / "labeled-images" / tract / category / label / src.name)
    (top / "labeled-images" / "image-labels.csv").write_text("Video file,Organ,Finding,Classification\n")
    return top


@pytest.fixture
def make_tree(tmp_path: Path) -> Callable[[dict[str, int]], Path]:
    """Factory: ``{class: n}`` -> a class-folder tree of n real frames per class."""

    def build(counts: dict[str, int]) -> Path:
        root = tmp_path / "custom"
        pool = gi_images("polyps", 60) + gi_images("normal-cecum", 60)
        k = 0
        for cls, n in counts.items():
            (root / cls).mkdir(parents=True, exist_ok=True)
            for _ in range(n):
                copy(pool[k], root / cls / f"img{k:03d}.jpg")
                k += 1
        return root

    return build
