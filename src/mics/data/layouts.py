"""Find the images of a data set on disk and pair them: folder layouts -> :class:`ImageSet`.

Supported layouts (``pair`` argument of :func:`discover`):

``virtual-nbi``
    ``<root>/<class>/<image>``: one image per sample (modality A, e.g. WLI); modality B is produced
    later by a partner generator. Kvasir v1/v2 downloads (``kvasir-dataset[-v2]/``) and HyperKvasir's
    ``labeled-images/`` tree are recognised and mapped to the six project classes.
``suffix:A,B``
    ``<root>/<class>/<id>__A.<ext>`` + ``<root>/<class>/<id>__B.<ext>`` (e.g. MILK10k's
    ``__clinical`` / ``__dermoscopic``); the group is ``<id>``.
``folders``
    The MICS authors' layout ``<root>/<class>_WLI/<x>.<ext>`` + ``<root>/<class>_NBI/<x>.<ext>``,
    paired by file stem.
``manifest``
    A CSV (the root itself, or ``<root>/manifest.csv``) with columns ``image_a,image_b,label,group``;
    ``image_b`` and ``group`` may be empty (or absent). Paths are relative to the CSV's folder and
    may not leave it. An optional ``classes.txt`` next to the CSV (one class name per line) declares
    the allowed labels, so that a typo becomes an error instead of a new class.
``auto``
    manifest.csv -> manifest; ``*_WLI``/``*_NBI`` folders -> folders; every image named
    ``<id>__<suffix>`` with two suffixes in all -> suffix; otherwise class folders -> virtual-nbi.

The default group of a single image is ``<class>/<file stem>`` (class-qualified so that two classes
that both contain ``1.jpg`` do not share a group).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mics.data.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
PAIR_MODES: tuple[str, ...] = ("auto", "virtual-nbi", "suffix:A,B", "folders", "manifest")
MANIFEST_NAME = "manifest.csv"
CLASSES_NAME = "classes.txt"
MANIFEST_COLUMNS: tuple[str, ...] = ("image_a", "image_b", "label", "group")
SUFFIX_SEP = "__"

KVASIR_CLASSES: tuple[str, ...] = (
    "esophagitis",
    "normal-cecum",
    "normal-pylorus",
    "normal-z-line",
    "polyps",
    "ulcerative-colitis",
)
KVASIR_IGNORED: tuple[str, ...] = ("dyed-lifted-polyps", "dyed-resection-margins")
KVASIR_DIRS: tuple[str, ...] = ("kvasir-dataset-v2", "kvasir-dataset")
HYPERKVASIR_DIR = "labeled-images"
HYPERKVASIR_TRACTS: tuple[str, ...] = ("lower-gi-tract", "upper-gi-tract")
HYPERKVASIR_LABELS: dict[str, str] = {
    "cecum": "normal-cecum",
    "pylorus": "normal-pylorus",
    "z-line": "normal-z-line",
    "esophagitis-a": "esophagitis",
    "esophagitis-b-d": "esophagitis",
    "polyps": "polyps",
}
HYPERKVASIR_UC_PREFIX = "ulcerative-colitis-grade"


@dataclass(frozen=True)
class Sample:
    """One case: the modality-A image, its modality-B partner (None: generated), class and group."""

    path_a: Path
    path_b: Path | None
    label: int
    group: str


@dataclass(frozen=True)
class ImageSet:
    """All samples of a data set, sorted by (label, path_a); ``label i`` means ``classes[i]``."""

    root: Path
    classes: tuple[str, ...]
    samples: tuple[Sample, ...]
    pair_mode: str
    modalities: tuple[str, str]

    def labels(self) -> np.ndarray:
        """Class indices, int64 [N]."""
        return np.fromiter((s.label for s in self.samples), dtype=np.int64, count=len(self.samples))

    def groups(self) -> list[str]:
        """Group (lesion / patient) id of each sample, [N]."""
        return [s.group for s in self.samples]

    def relpath(self, path: Path) -> str:
        """``path`` relative to the root as a POSIX string (absolute if it lies outside the root)."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()

    def class_counts(self) -> dict[str, int]:
        """Number of samples per class name (0 for a class without samples)."""
        counts = np.bincount(self.labels(), minlength=len(self.classes))
        return {name: int(counts[i]) for i, name in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.samples)


def discover(root: str | Path, pair: str = "auto") -> ImageSet:
    """Find and pair the images under ``root`` according to ``pair`` (see the module docstring)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data path {root} does not exist; pass the folder that holds the class folders")
    root = root.resolve()
    mode = _parse_pair(pair)
    if root.is_file():
        if mode not in ("auto", "manifest"):
            raise DataError(f"{root} is a file; a file can only be a manifest CSV (--pair manifest)")
        return _load_manifest(root)
    if mode == "auto":
        mode = _detect(root)
        log.info("data layout of %s detected as %s", root, mode)
    if mode == "manifest":
        if MANIFEST_NAME not in _names(root):
            raise DataError(f"no {MANIFEST_NAME} in {root}; create it or pass the CSV file itself")
        return _load_manifest(root / MANIFEST_NAME)
    if mode == "folders":
        return _load_folders(root)
    if mode.startswith("suffix"):
        suffixes = _detect_suffixes(root) if mode == "suffix" else tuple(mode.split(":", 1)[1].split(","))
        if suffixes is None:
            raise DataError(
                f"could not find <id>__<A>.<ext> / <id>__<B>.<ext> pairs under {root}; "
                "name the suffixes explicitly, e.g. --pair suffix:clinical,dermoscopic"
            )
        return _load_suffix(root, (suffixes[0], suffixes[1]))
    return _load_single(root)


def _parse_pair(pair: str) -> str:
    pair = pair.strip()
    if pair in ("auto", "virtual-nbi", "folders", "manifest", "suffix"):
        return pair
    if pair.startswith("suffix:"):
        parts = [p.strip() for p in pair.split(":", 1)[1].split(",")]
        if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
            raise DataError(f"--pair {pair!r}: give two different suffixes, e.g. suffix:clinical,dermoscopic")
        return f"suffix:{parts[0]},{parts[1]}"
    raise DataError(f"unknown pair mode {pair!r}; choose one of {', '.join(PAIR_MODES)}")


def _names(folder: Path) -> set[str]:
    """Exact-case entry names (``Path.exists`` is case-insensitive on macOS and Windows)."""
    return set(os.listdir(folder))


def _subdirs(folder: Path) -> list[Path]:
    """Sub-folders, sorted; hidden ones and the ``__MACOSX`` litter of zip files are skipped."""
    return sorted(
        p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX"
    )


def _images_in(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted; hidden files are skipped."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _is_wli_nbi(name: str) -> str | None:
    lower = name.lower()
    for tag in ("wli", "nbi"):
        if lower.endswith("_" + tag) and len(name) > 4:
            return tag
    return None


def _detect(root: Path) -> str:
    if MANIFEST_NAME in _names(root):
        return "manifest"
    dirs = _subdirs(root)
    if any(_is_wli_nbi(d.name) for d in dirs):
        return "folders"
    if _kvasir_dir(root) is not None or _hyperkvasir_dir(root) is not None:
        return "virtual-nbi"
    suffixes = _detect_suffixes(root)
    if suffixes is not None:
        return f"suffix:{suffixes[0]},{suffixes[1]}"
    return "virtual-nbi"


def _detect_suffixes(root: Path) -> tuple[str, str] | None:
    """The two suffixes if every image under the class folders is named ``<id>__<suffix>``."""
    suffixes: set[str] = set()
    count = 0
    for d in _subdirs(root):
        for p in _images_in(d):
            count += 1
            if SUFFIX_SEP not in p.stem:
                return None
            ident, suffix = p.stem.rsplit(SUFFIX_SEP, 1)
            if not ident or not suffix:
                return None
            suffixes.add(suffix)
            if len(suffixes) > 2:
                return None
    if count == 0 or len(suffixes) != 2:
        return None
    first, second = sorted(suffixes)
    return first, second


def _class_folders(root: Path) -> dict[str, list[Path]]:
    """``{class name: image files}`` for the class folders of ``root``; errors name empty folders."""
    dirs = _subdirs(root)
    if not dirs:
        loose = _images_in(root)
        hint = f" ({len(loose)} images lie directly in it)" if loose else ""
        raise DataError(
            f"no class folders in {root}{hint}; put the images in {root}/<class name>/ "
            "(one folder per class) or pass a manifest CSV"
        )
    folders: dict[str, list[Path]] = {}
    for d in dirs:
        files = _images_in(d)
        if not files:
            nested = any(_images_in(s) for s in _subdirs(d))
            hint = "; images must be directly inside it, not in sub-folders" if nested else ""
            raise DataError(
                f"class folder {d} has no images ({', '.join(IMAGE_EXTENSIONS)}){hint}; "
                "add images or remove the folder"
            )
        folders[d.name] = files
    return folders


def _build(
    root: Path,
    entries: Iterable[tuple[str, Path, Path | None, str]],
    pair_mode: str,
    modalities: tuple[str, str],
    classes: Iterable[str] | None = None,
) -> ImageSet:
    """ImageSet from ``(class, path_a, path_b, group)`` entries; classes sorted, samples sorted."""
    entries = list(entries)
    names = sorted(set(classes) if classes is not None else {e[0] for e in entries})
    if not entries:
        raise DataError(f"no images found in {root}; expected {', '.join(IMAGE_EXTENSIONS)} files")
    index = {name: i for i, name in enumerate(names)}
    samples = sorted(
        (Sample(path_a=a, path_b=b, label=index[c], group=g) for c, a, b, g in entries),
        key=lambda s: (s.label, str(s.path_a)),
    )
    return ImageSet(
        root=root, classes=tuple(names), samples=tuple(samples), pair_mode=pair_mode, modalities=modalities
    )


def _load_single(root: Path) -> ImageSet:
    kvasir = _kvasir_dir(root)
    if kvasir is not None:
        return _build(root, _kvasir_entries(kvasir), "virtual-nbi", ("WLI", "NBI"))
    hyper = _hyperkvasir_dir(root)
    if hyper is not None:
        return _build(root, _hyperkvasir_entries(hyper), "virtual-nbi", ("WLI", "NBI"))
    folders = _class_folders(root)
    if set(folders) == set(KVASIR_CLASSES) | set(KVASIR_IGNORED):
        return _build(root, _kvasir_entries(root), "virtual-nbi", ("WLI", "NBI"))
    entries = [(c, p, None, f"{c}/{p.stem}") for c, files in folders.items() for p in files]
    return _build(root, entries, "virtual-nbi", ("WLI", "NBI"))


def _kvasir_dir(root: Path) -> Path | None:
    if root.name in KVASIR_DIRS:
        return root
    found = [root / name for name in KVASIR_DIRS if name in _names(root) and (root / name).is_dir()]
    if len(found) > 1:
        raise DataError(
            f"{root} holds both {found[0].name}/ and {found[1].name}/; pass one of them as the data path"
        )
    return found[0] if found else None


def _kvasir_entries(folder: Path) -> list[tuple[str, Path, Path | None, str]]:
    """Kvasir v1/v2: keep the six project classes; the two dyed-* classes are left out on purpose."""
    entries: list[tuple[str, Path, Path | None, str]] = []
    for d in _subdirs(folder):
        if d.name in KVASIR_IGNORED:
            log.info("Kvasir: leaving out %s/ (not one of the six classes of the paper)", d.name)
            continue
        if d.name not in KVASIR_CLASSES:
            log.info("Kvasir: ignoring unexpected folder %s", d)
            continue
        files = _images_in(d)
        if not files:
            raise DataError(f"Kvasir class folder {d} has no images; re-extract the download")
        entries += [(d.name, p, None, f"{d.name}/{p.stem}") for p in files]
    if not entries:
        raise DataError(
            f"no Kvasir class folders with images in {folder}; expected some of {', '.join(KVASIR_CLASSES)}"
        )
    return entries


def _hyperkvasir_dir(root: Path) -> Path | None:
    if root.name == HYPERKVASIR_DIR:
        return root
    names = _names(root)
    if HYPERKVASIR_DIR in names and (root / HYPERKVASIR_DIR).is_dir():
        return root / HYPERKVASIR_DIR
    if all(t in names for t in HYPERKVASIR_TRACTS):
        return root
    return None


def _hyperkvasir_class(label: str) -> str | None:
    if label.startswith(HYPERKVASIR_UC_PREFIX):
        return "ulcerative-colitis"
    return HYPERKVASIR_LABELS.get(label)


def _hyperkvasir_entries(folder: Path) -> list[tuple[str, Path, Path | None, str]]:
    """``labeled-images/<tract>/<category>/<label>/*.jpg`` -> the six Kvasir classes."""
    entries: list[tuple[str, Path, Path | None, str]] = []
    skipped: list[str] = []
    for tract in _subdirs(folder):
        for category in _subdirs(tract):
            for label_dir in _subdirs(category):
                cls = _hyperkvasir_class(label_dir.name)
                if cls is None:
                    skipped.append(label_dir.name)
                    continue
                files = _images_in(label_dir)
                if not files:
                    raise DataError(
                        f"HyperKvasir label folder {label_dir} has no images; re-extract the download"
                    )
                entries += [(cls, p, None, f"{cls}/{p.stem}") for p in files]
    if skipped:
        log.info(
            "HyperKvasir: leaving out labels outside the six classes: %s", ", ".join(sorted(set(skipped)))
        )
    if not entries:
        raise DataError(
            f"no usable HyperKvasir images in {folder}; expected "
            f"{HYPERKVASIR_DIR}/<tract>/<category>/<label>/*.jpg with labels {', '.join(HYPERKVASIR_LABELS)}"
        )
    return entries


def _load_suffix(root: Path, suffixes: tuple[str, str]) -> ImageSet:
    a_tag, b_tag = suffixes
    folders = _class_folders(root)
    entries: list[tuple[str, Path, Path | None, str]] = []
    seen: dict[str, Path] = {}
    for cls, files in folders.items():
        by_id: dict[str, dict[str, list[Path]]] = defaultdict(lambda: defaultdict(list))
        for p in files:
            if SUFFIX_SEP not in p.stem:
                log.info("suffix pairs: ignoring %s (no %s<suffix> in its name)", p, SUFFIX_SEP)
                continue
            ident, tag = p.stem.rsplit(SUFFIX_SEP, 1)
            if tag not in suffixes:
                log.info("suffix pairs: ignoring %s (suffix %r is neither %r nor %r)", p, tag, a_tag, b_tag)
                continue
            by_id[ident][tag].append(p)
        for ident in sorted(by_id):
            tags = by_id[ident]
            for tag in suffixes:
                if len(tags[tag]) > 1:
                    raise DataError(
                        f"duplicated partner: {' and '.join(str(p) for p in tags[tag])} are both "
                        f"{ident}{SUFFIX_SEP}{tag}; keep one of them"
                    )
            present = [t for t in suffixes if tags[t]]
            if len(present) == 1:
                have = tags[present[0]][0]
                missing = b_tag if present[0] == a_tag else a_tag
                raise DataError(
                    f"missing partner: {have} has no {ident}{SUFFIX_SEP}{missing}.<ext> next to it; "
                    "add it or remove the file"
                )
            if ident in seen:
                raise DataError(
                    f"id {ident!r} appears in two classes ({seen[ident].parent.name} and {cls}): "
                    f"{seen[ident]} and {tags[a_tag][0]}; a lesion must have one label"
                )
            seen[ident] = tags[a_tag][0]
            entries.append((cls, tags[a_tag][0], tags[b_tag][0], ident))
    if not entries:
        raise DataError(f"no {a_tag}/{b_tag} pairs (<id>{SUFFIX_SEP}{a_tag}.<ext>) found under {root}")
    return _build(root, entries, f"suffix:{a_tag},{b_tag}", (a_tag, b_tag))


def _load_folders(root: Path) -> ImageSet:
    """``<class>_WLI/x`` + ``<class>_NBI/x``, paired by stem; the group is ``<class>/<stem>``."""
    by_class: dict[str, dict[str, Path]] = defaultdict(dict)
    for d in _subdirs(root):
        tag = _is_wli_nbi(d.name)
        if tag is None:
            log.info("WLI/NBI folders: ignoring %s (not <class>_WLI or <class>_NBI)", d)
            continue
        by_class[d.name[:-4]][tag] = d
    if not by_class:
        raise DataError(f"no <class>_WLI / <class>_NBI folders in {root}")
    entries: list[tuple[str, Path, Path | None, str]] = []
    for cls in sorted(by_class):
        pair = by_class[cls]
        for tag in ("wli", "nbi"):
            if tag not in pair:
                present = pair["nbi" if tag == "wli" else "wli"]
                raise DataError(f"{present} has no matching {cls}_{tag.upper()} folder; add it")
        stems = {tag: _stems(pair[tag]) for tag in ("wli", "nbi")}
        for tag, other in (("wli", "nbi"), ("nbi", "wli")):
            for stem, path in stems[tag].items():
                if stem not in stems[other]:
                    raise DataError(
                        f"missing partner: {path} has no file named {stem}.<ext> in {pair[other]}; "
                        "add it or remove the file"
                    )
        entries += [(cls, stems["wli"][s], stems["nbi"][s], f"{cls}/{s}") for s in sorted(stems["wli"])]
    return _build(root, entries, "folders", ("WLI", "NBI"))


def _stems(folder: Path) -> dict[str, Path]:
    files = _images_in(folder)
    if not files:
        raise DataError(f"class folder {folder} has no images; add images or remove the folder")
    out: dict[str, Path] = {}
    for p in files:
        if p.stem in out:
            raise DataError(f"duplicated partner: {out[p.stem]} and {p} have the same name; keep one of them")
        out[p.stem] = p
    return out


def _load_manifest(csv_path: Path) -> ImageSet:
    """Parse a manifest CSV; every problem is a DataError naming the line."""
    base = csv_path.parent
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"manifest {csv_path} is not UTF-8 text ({err.reason}); save it as UTF-8 CSV"
        ) from None
    except OSError as err:
        raise DataError(f"cannot read manifest {csv_path}: {err.strerror or err}") from None
    if "\x00" in text:
        raise DataError(f"manifest {csv_path} contains NUL bytes; it is not a CSV text file")
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, list[str]]] = []
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                rows.append((reader.line_num, row))
    except csv.Error as err:
        raise DataError(f"manifest {csv_path} is not valid CSV (line {reader.line_num}): {err}") from None
    if not rows:
        raise DataError(f"manifest {csv_path} is empty; its first line must be {','.join(MANIFEST_COLUMNS)}")
    header = [cell.strip().lower() for cell in rows[0][1]]
    missing = [c for c in ("image_a", "label") if c not in header]
    if missing:
        raise DataError(
            f"manifest {csv_path} lacks column(s) {', '.join(missing)}; the header must name "
            f"{','.join(MANIFEST_COLUMNS)} (image_b and group may be empty), found {','.join(header)}"
        )
    col = {name: header.index(name) for name in MANIFEST_COLUMNS if name in header}
    declared = _declared_classes(base)
    entries: list[tuple[str, Path, Path | None, str]] = []
    first_line: dict[Path, int] = {}
    for line, row in rows[1:]:

        def cell(name: str, row: list[str] = row) -> str:
            i = col.get(name)
            return row[i].strip() if i is not None and i < len(row) else ""

        where = f"manifest {csv_path} line {line}"
        label = cell("label")
        if not label:
            raise DataError(f"{where}: empty label; every row needs a class name")
        if declared is not None and label not in declared:
            raise DataError(
                f"{where}: unknown label {label!r}; {base / CLASSES_NAME} allows "
                f"{', '.join(sorted(declared))}"
            )
        raw_a = cell("image_a")
        if not raw_a:
            raise DataError(f"{where}: empty image_a; every row needs a modality-A image")
        path_a = _manifest_path(base, raw_a, where, "image_a")
        raw_b = cell("image_b")
        path_b = _manifest_path(base, raw_b, where, "image_b") if raw_b else None
        for p in (path_a, path_b):
            if p is None:
                continue
            if p in first_line:
                raise DataError(
                    f"{where}: {p} is already used on line {first_line[p]}; each image may appear once"
                )
            first_line[p] = line
        group = cell("group") or Path(raw_a).with_suffix("").as_posix()
        entries.append((label, path_a, path_b, group))
    if not entries:
        raise DataError(f"manifest {csv_path} has a header but no rows")
    return _build(base, entries, "manifest", ("A", "B"), classes=declared)


def _declared_classes(base: Path) -> set[str] | None:
    if CLASSES_NAME not in _names(base):
        return None
    names = {line.strip() for line in (base / CLASSES_NAME).read_text(encoding="utf-8").splitlines()}
    names.discard("")
    if not names:
        raise DataError(f"{base / CLASSES_NAME} is empty; list one class name per line or delete it")
    return names


def _manifest_path(base: Path, raw: str, where: str, column: str) -> Path:
    """Resolve a manifest path; it must exist, be a file and stay inside the manifest's folder."""
    if "\x00" in raw:
        raise DataError(f"{where}: {column} {raw!r} is not a valid path")
    candidate = Path(os.path.normpath(base / raw))
    try:
        candidate.relative_to(base)
    except ValueError:
        raise DataError(
            f"{where}: {column} {raw!r} points outside {base}; manifest paths must stay inside the "
            "manifest's folder (move the images there or the manifest up)"
        ) from None
    if candidate == base:
        raise DataError(f"{where}: {column} {raw!r} is the manifest's folder, not an image file")
    try:
        is_file = candidate.is_file()
        exists = is_file or candidate.exists()
    except (OSError, ValueError) as err:
        raise DataError(f"{where}: {column} {raw!r} is not a usable path ({err})") from None
    if not exists:
        raise DataError(f"{where}: {column} {raw!r} does not exist ({candidate})")
    if not is_file:
        raise DataError(f"{where}: {column} {raw!r} is not a file ({candidate})")
    return candidate
