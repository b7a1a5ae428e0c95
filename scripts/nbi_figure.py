"""Draw docs/figures/nbi_examples.png: bundled HyperKvasir WLI frames next to their virtual NBI.

Run from the repository root:

    python scripts/nbi_figure.py [--data data/sample/hyperkvasir-2class] [--out docs/figures/nbi_examples.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from mics.data.cache import square_resize
from mics.data.layouts import discover
from mics.data.validate import load_rgb
from mics.nbi.virtual import VirtualNBI

PER_CLASS = 3
SIZE = 128


def pick(root: Path, per_class: int) -> tuple[list[Path], list[str]]:
    """The first ``per_class`` images of each class (the data set's own deterministic order)."""
    images = discover(root, pair="virtual-nbi")
    paths, names = [], []
    for label, name in enumerate(images.classes):
        chosen = [s.path_a for s in images.samples if s.label == label][:per_class]
        paths += chosen
        names += [name] * len(chosen)
    return paths, names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/sample/hyperkvasir-2class"))
    ap.add_argument("--out", type=Path, default=Path("docs/figures/nbi_examples.png"))
    args = ap.parse_args()
    paths, names = pick(args.data, PER_CLASS)
    wli = np.stack([square_resize(load_rgb(p), SIZE) for p in paths])  # [N, H, W, 3]
    nbi = VirtualNBI()(wli)
    fig, axes = plt.subplots(2, len(paths), figsize=(1.9 * len(paths), 4.1), squeeze=False)
    for j, name in enumerate(names):
        axes[0, j].imshow(wli[j])
        axes[1, j].imshow(nbi[j])
        axes[0, j].set_title(name, fontsize=9)
    axes[0, 0].set_ylabel("white light (input)", fontsize=9)
    axes[1, 0].set_ylabel("virtual NBI", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{VirtualNBI.name}: bundled HyperKvasir frames and their generated partners", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
