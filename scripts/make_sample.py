"""Rebuild the real-image sample bundled under data/sample/ from the packs in ../shared/data.

The selection is deterministic (sha256 order of the lesion id / file stem), copies image bytes
unchanged and writes a MANIFEST.csv per pack. Run from the repository root:

    python scripts/make_sample.py --shared ../shared/data
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import shutil
from pathlib import Path

MILK_CLASSES = {"BCC": 120, "BKL": 120, "MEL": 120, "NV": 120, "SCCKA": 120}
GI_CLASSES = {"polyps": 200, "normal-cecum": 200}


def _key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _read_manifest(folder: Path) -> list[dict[str, str]]:
    with open(folder / "MANIFEST.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def copy_milk(src: Path, dst: Path) -> int:
    rows = _read_manifest(src)
    fields = [
        "path",
        "class",
        "lesion_id",
        "modality",
        "isic_id",
        "diagnosis_full",
        "copyright_license",
        "attribution",
    ]
    kept = []
    for cls, n in MILK_CLASSES.items():
        lesions = sorted({r["lesion_id"] for r in rows if r["class"] == cls}, key=_key)[:n]
        chosen = set(lesions)
        kept += [r for r in rows if r["class"] == cls and r["lesion_id"] in chosen]
    for r in kept:
        (dst / r["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / r["path"], dst / r["path"])
    with open(dst / "MANIFEST.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(sorted(kept, key=lambda r: r["path"]))
    shutil.copyfile(src / "LICENSE-CC-BY-NC-4.0.txt", dst / "LICENSE-CC-BY-NC-4.0.txt")
    return len(kept)


def copy_gi(src: Path, dst: Path) -> int:
    rows = _read_manifest(src)
    fields = ["path", "class", "source_label", "original_file_name", "hyperkvasir_split_index"]
    kept = []
    for cls, n in GI_CLASSES.items():
        kept += sorted((r for r in rows if r["class"] == cls), key=lambda r: _key(r["path"]))[:n]
    for r in kept:
        (dst / r["path"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / r["path"], dst / r["path"])
    with open(dst / "MANIFEST.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(sorted(kept, key=lambda r: r["path"]))
    return len(kept)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shared", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("data/sample"))
    args = ap.parse_args()
    n_milk = copy_milk(args.shared / "milk10k-paired-128", args.out / "milk10k-5class")
    n_gi = copy_gi(args.shared / "hyperkvasir-partial-128", args.out / "hyperkvasir-2class")
    print(f"copied {n_milk} MILK10k images and {n_gi} HyperKvasir images into {args.out}")


if __name__ == "__main__":
    main()
