"""discover(): every layout on real bundled images, auto-detection, and the errors naming the culprit."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from data_helpers import GI, MILK, copy, gi_images, milk_lesions

from mics.data import DataError, ImageSet, discover
from mics.data.layouts import KVASIR_CLASSES


def _by_class(images: ImageSet) -> dict[str, int]:
    return {c: int((images.labels() == i).sum()) for i, c in enumerate(images.classes)}


def _check_sorted(images: ImageSet) -> None:
    keys = [(s.label, str(s.path_a)) for s in images.samples]
    assert keys == sorted(keys)
    assert list(images.classes) == sorted(images.classes)


# ---------------------------------------------------------------- layouts


def test_class_folders_auto_is_virtual_nbi_and_ignores_root_files(class_tree: Path) -> None:
    images = discover(class_tree)
    assert images.pair_mode == "virtual-nbi"
    assert images.modalities == ("WLI", "NBI")
    assert images.classes == ("normal-cecum", "polyps")
    assert len(images) == 12 and _by_class(images) == {"normal-cecum": 6, "polyps": 6}
    assert all(s.path_b is None for s in images.samples)
    expected = sorted((p.parent.name, p) for p in class_tree.glob("*/*.jpg"))
    assert [(images.classes[s.label], s.path_a) for s in images.samples] == expected
    assert images.groups()[0] == f"normal-cecum/{expected[0][1].stem}"
    assert images.labels().dtype == np.int64
    _check_sorted(images)


def test_bundled_packs_are_discovered() -> None:
    milk = discover(MILK)
    assert milk.pair_mode == "suffix:clinical,dermoscopic"
    assert milk.classes == ("BCC", "BKL", "MEL", "NV", "SCCKA")
    assert len(milk) == 600 and set(_by_class(milk).values()) == {120}
    assert len(set(milk.groups())) == 600
    gi = discover(GI)
    assert gi.pair_mode == "virtual-nbi" and gi.classes == ("normal-cecum", "polyps") and len(gi) == 400


def test_suffix_pairs_auto_and_explicit_order(suffix_tree: Path) -> None:
    images = discover(suffix_tree)
    assert images.pair_mode == "suffix:clinical,dermoscopic"
    assert images.modalities == ("clinical", "dermoscopic")
    assert len(images) == 15
    for s in images.samples:
        assert s.path_a.name == f"{s.group}__clinical.jpg"
        assert s.path_b is not None and s.path_b.name == f"{s.group}__dermoscopic.jpg"
        assert s.path_a.parent.name == images.classes[s.label]
    swapped = discover(suffix_tree, pair="suffix:dermoscopic,clinical")
    assert swapped.modalities == ("dermoscopic", "clinical")
    assert [(s.path_a, s.path_b) for s in swapped.samples] == [(s.path_b, s.path_a) for s in images.samples]
    assert discover(suffix_tree, pair="suffix").pair_mode == "suffix:clinical,dermoscopic"


def test_suffix_mode_ignores_third_suffix_and_plain_files(
    suffix_tree: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ident = milk_lesions("BCC", 1)[0]
    copy(MILK / "BCC" / f"{ident}__clinical.jpg", suffix_tree / "BCC" / f"{ident}__overview.jpg")
    copy(MILK / "BCC" / f"{ident}__clinical.jpg", suffix_tree / "BCC" / "loose.jpg")
    with caplog.at_level(logging.INFO, logger="mics.data"):
        images = discover(suffix_tree, pair="suffix:clinical,dermoscopic")
    assert len(images) == 15
    assert "overview" in caplog.text and "loose.jpg" in caplog.text


def test_virtual_nbi_on_suffix_tree_takes_each_file(suffix_tree: Path) -> None:
    images = discover(suffix_tree, pair="virtual-nbi")
    assert images.pair_mode == "virtual-nbi" and len(images) == 30


def test_wli_nbi_folders(folders_tree: Path) -> None:
    for pair in ("auto", "folders"):
        images = discover(folders_tree, pair=pair)
        assert images.pair_mode == "folders" and images.modalities == ("WLI", "NBI")
        assert images.classes == ("BCC", "NV") and len(images) == 8
        for s in images.samples:
            cls = images.classes[s.label]
            assert s.path_a.parent.name == f"{cls}_WLI"
            assert s.path_b is not None and s.path_b.parent.name == f"{cls}_NBI"
            assert s.path_a.stem == s.path_b.stem and s.group == f"{cls}/{s.path_a.stem}"
        # two classes share stems 0..3 but not groups
        assert len(set(images.groups())) == 8


def test_manifest_in_folder_and_as_file(manifest_tree: Path) -> None:
    for root in (manifest_tree, manifest_tree / "manifest.csv"):
        images = discover(root)
        assert images.pair_mode == "manifest" and images.root == manifest_tree.resolve()
        assert images.classes == ("BCC", "MEL") and len(images) == 8
        with_b = [s for s in images.samples if s.path_b is not None]
        assert len(with_b) == 4
        for s in images.samples:
            assert s.path_a.is_file() and s.path_a.name.endswith("_c.jpg")
        groups = images.groups()
        assert groups.count("patient0") == 2 and groups.count("patient1") == 2
        assert sum(g.startswith("imgs/") for g in groups) == 4


def test_manifest_mode_explicit_on_folder(manifest_tree: Path) -> None:
    assert discover(manifest_tree, pair="manifest").pair_mode == "manifest"


@pytest.mark.parametrize("fixture", ["kvasir_v1", "kvasir_v2"])
def test_kvasir_download(
    fixture: str, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    top: Path = request.getfixturevalue(fixture)
    for root in (top, top.parent):
        with caplog.at_level(logging.INFO, logger="mics.data"):
            images = discover(root)
        assert images.pair_mode == "virtual-nbi"
        assert images.classes == tuple(sorted(KVASIR_CLASSES))
        assert set(_by_class(images).values()) == {3}
        assert not any("dyed" in str(s.path_a) for s in images.samples)
        assert "dyed-lifted-polyps" in caplog.text
        caplog.clear()


def test_renamed_kvasir_folder_is_recognised_by_its_classes(kvasir_v2: Path) -> None:
    renamed = kvasir_v2.parent / "my-kvasir"
    kvasir_v2.rename(renamed)
    images = discover(renamed)
    assert images.classes == tuple(sorted(KVASIR_CLASSES))


def test_both_kvasir_versions_side_by_side_is_ambiguous(kvasir_v1: Path, tmp_path: Path) -> None:
    shutil.copytree(kvasir_v1, kvasir_v1.parent / "kvasir-dataset-v2")
    with pytest.raises(DataError, match="kvasir-dataset-v2"):
        discover(kvasir_v1.parent)


def test_hyperkvasir_labeled_images(hyperkvasir_tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    for root in (hyperkvasir_tree, hyperkvasir_tree / "labeled-images", hyperkvasir_tree / "labeled-images"):
        with caplog.at_level(logging.INFO, logger="mics.data"):
            images = discover(root)
        assert images.pair_mode == "virtual-nbi"
        assert images.classes == tuple(sorted(KVASIR_CLASSES))
        assert set(_by_class(images).values()) == {2}
        assert not any(s.path_a.parent.name in ("barretts", "retroflex-rectum") for s in images.samples)
        uc = [s.path_a.parent.name for s in images.samples if images.classes[s.label] == "ulcerative-colitis"]
        assert sorted(uc) == ["ulcerative-colitis-grade-1", "ulcerative-colitis-grade-2-3"]
        eso = [s.path_a.parent.name for s in images.samples if images.classes[s.label] == "esophagitis"]
        assert sorted(eso) == ["esophagitis-a", "esophagitis-b-d"]
        assert "barretts" in caplog.text


def test_str_and_tilde_paths(class_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(class_tree.parent))
    assert len(discover(f"~/{class_tree.name}")) == 12
    assert len(discover(str(class_tree))) == 12


# ---------------------------------------------------------------- errors


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"does not exist") as err:
        discover(tmp_path / "nope")
    assert "nope" in str(err.value)


def test_no_class_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        discover(tmp_path / "empty")
    loose = tmp_path / "loose"
    copy(gi_images("polyps", 1)[0], loose / "a.jpg")
    with pytest.raises(DataError, match="1 images lie directly in it"):
        discover(loose)


def test_empty_class_folder_is_named(class_tree: Path) -> None:
    (class_tree / "esophagitis").mkdir()
    (class_tree / "esophagitis" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="esophagitis") as err:
        discover(class_tree)
    assert "has no images" in str(err.value)


def test_nested_images_hint(class_tree: Path) -> None:
    copy(gi_images("polyps", 1)[0], class_tree / "ulcer" / "sub" / "a.jpg")
    with pytest.raises(DataError, match="not in sub-folders"):
        discover(class_tree)


def test_suffix_missing_partner_names_file(suffix_tree: Path) -> None:
    ident = milk_lesions("MEL", 2)[1]
    (suffix_tree / "MEL" / f"{ident}__dermoscopic.jpg").unlink()
    with pytest.raises(DataError, match="missing partner") as err:
        discover(suffix_tree)
    assert f"{ident}__clinical.jpg" in str(err.value) and f"{ident}__dermoscopic" in str(err.value)


def test_suffix_duplicated_partner_names_both_files(suffix_tree: Path) -> None:
    ident = milk_lesions("NV", 1)[0]
    copy(suffix_tree / "NV" / f"{ident}__clinical.jpg", suffix_tree / "NV" / f"{ident}__clinical.png")
    with pytest.raises(DataError, match="duplicated partner") as err:
        discover(suffix_tree)
    assert f"{ident}__clinical.jpg" in str(err.value) and f"{ident}__clinical.png" in str(err.value)


def test_suffix_id_in_two_classes(suffix_tree: Path) -> None:
    ident = milk_lesions("NV", 1)[0]
    for tag in ("clinical", "dermoscopic"):
        copy(suffix_tree / "NV" / f"{ident}__{tag}.jpg", suffix_tree / "BCC" / f"{ident}__{tag}.jpg")
    with pytest.raises(DataError, match=f"{ident}.*two classes"):
        discover(suffix_tree)


def test_suffix_explicit_without_pairs(class_tree: Path) -> None:
    with pytest.raises(DataError, match="no clinical/dermoscopic pairs"):
        discover(class_tree, pair="suffix:clinical,dermoscopic")
    with pytest.raises(DataError, match="name the suffixes explicitly"):
        discover(class_tree, pair="suffix")


def test_folders_missing_partner_names_file(folders_tree: Path) -> None:
    (folders_tree / "NV_NBI" / "2.jpg").unlink()
    with pytest.raises(DataError, match="missing partner") as err:
        discover(folders_tree)
    assert str(folders_tree / "NV_WLI" / "2.jpg") in str(err.value)


def test_folders_duplicated_partner(folders_tree: Path) -> None:
    copy(folders_tree / "BCC_NBI" / "1.jpg", folders_tree / "BCC_NBI" / "1.png")
    with pytest.raises(DataError, match="duplicated partner") as err:
        discover(folders_tree)
    assert "1.png" in str(err.value)


def test_folders_missing_modality_folder(folders_tree: Path) -> None:
    shutil.rmtree(folders_tree / "BCC_NBI")
    with pytest.raises(DataError, match="BCC_NBI"):
        discover(folders_tree)


def _write_manifest(root: Path, text: str) -> Path:
    (root / "manifest.csv").write_text(text)
    return root


def test_manifest_missing_columns(manifest_tree: Path) -> None:
    _write_manifest(manifest_tree, "image,label\nimgs/a.jpg,BCC\n")
    with pytest.raises(DataError, match="lacks column.*image_a") as err:
        discover(manifest_tree)
    assert "manifest.csv" in str(err.value)


def test_manifest_empty_label_names_line(manifest_tree: Path) -> None:
    lines = (manifest_tree / "manifest.csv").read_text().splitlines()
    lines[3] = ",".join(lines[3].split(",")[:2] + ["", ""])
    _write_manifest(manifest_tree, "\n".join(lines))
    with pytest.raises(DataError, match="line 4: empty label"):
        discover(manifest_tree)


def test_manifest_unknown_label_with_declared_classes(manifest_tree: Path) -> None:
    (manifest_tree / "classes.txt").write_text("BCC\nMEL\nNV\n")
    images = discover(manifest_tree)
    assert images.classes == ("BCC", "MEL", "NV")  # declared, even if NV has no rows yet
    text = (manifest_tree / "manifest.csv").read_text().replace(",MEL,", ",MLE,", 1)
    _write_manifest(manifest_tree, text)
    with pytest.raises(DataError, match=r"line \d+: unknown label 'MLE'"):
        discover(manifest_tree)


@pytest.mark.parametrize("bad", ["../outside.jpg", "imgs/../../outside.jpg", "ABS"])
def test_manifest_escaping_path(manifest_tree: Path, bad: str) -> None:
    outside = copy(gi_images("polyps", 1)[0], manifest_tree.parent / "outside.jpg")
    bad = str(outside) if bad == "ABS" else bad
    _write_manifest(manifest_tree, f"image_a,image_b,label,group\n{bad},,BCC,\n")
    with pytest.raises(DataError, match="line 2: image_a .* points outside"):
        discover(manifest_tree)


def test_manifest_absolute_path_inside_is_fine(manifest_tree: Path) -> None:
    inside = next((manifest_tree / "imgs").glob("*_c.jpg"))
    _write_manifest(manifest_tree, f"image_a,label\n{inside},BCC\n")
    images = discover(manifest_tree)
    assert images.samples[0].path_a == inside.resolve() and images.samples[0].path_b is None


def test_manifest_missing_file_and_directory(manifest_tree: Path) -> None:
    _write_manifest(manifest_tree, "image_a,image_b,label\nimgs/ghost.jpg,,BCC\n")
    with pytest.raises(DataError, match="line 2: image_a 'imgs/ghost.jpg' does not exist"):
        discover(manifest_tree)
    _write_manifest(manifest_tree, "image_a,image_b,label\nimgs,,BCC\n")
    with pytest.raises(DataError, match="is not a file"):
        discover(manifest_tree)


def test_manifest_duplicated_image(manifest_tree: Path) -> None:
    a = next((manifest_tree / "imgs").glob("*_c.jpg")).name
    _write_manifest(manifest_tree, f"image_a,image_b,label\nimgs/{a},,BCC\nimgs/{a},,MEL\n")
    with pytest.raises(DataError, match="line 3: .* already used on line 2"):
        discover(manifest_tree)


def test_manifest_empty_and_header_only(manifest_tree: Path) -> None:
    _write_manifest(manifest_tree, "")
    with pytest.raises(DataError, match="is empty"):
        discover(manifest_tree)
    _write_manifest(manifest_tree, "image_a,image_b,label,group\n")
    with pytest.raises(DataError, match="no rows"):
        discover(manifest_tree)


def test_manifest_not_utf8(manifest_tree: Path) -> None:
    (manifest_tree / "manifest.csv").write_bytes(b"image_a,label\n\xff\xfe,BCC\n")
    with pytest.raises(DataError, match="not UTF-8"):
        discover(manifest_tree)


def test_unknown_pair_mode(class_tree: Path) -> None:
    with pytest.raises(DataError, match="unknown pair mode 'pairs'"):
        discover(class_tree, pair="pairs")
    with pytest.raises(DataError, match="two different suffixes"):
        discover(class_tree, pair="suffix:a,a")


def test_file_root_must_be_manifest(class_tree: Path) -> None:
    with pytest.raises(DataError, match="can only be a manifest"):
        discover(class_tree / "README.md", pair="folders")


def test_uppercase_manifest_is_not_a_manifest(class_tree: Path) -> None:
    # MANIFEST.csv of the bundled packs describes them; only an exact manifest.csv switches modes
    assert "manifest.csv" not in os.listdir(class_tree)
    assert discover(class_tree).pair_mode == "virtual-nbi"
