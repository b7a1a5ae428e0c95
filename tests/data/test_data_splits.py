"""make_split / labelled_subset / save_split / load_split: properties checked against plain loops."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from data_helpers import MILK

from mics.data import DataError, Split, discover, labelled_subset, load_split, make_split, save_split


def _dataset(n_groups: list[int], per_group: int = 2, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Labels and groups: class c has n_groups[c] groups of ``per_group`` samples, shuffled order."""
    labels, groups = [], []
    for c, n in enumerate(n_groups):
        for g in range(n):
            labels += [c] * per_group
            groups += [f"c{c}-g{g}"] * per_group
    order = np.random.default_rng(seed).permutation(len(labels))
    return np.array(labels)[order], [groups[i] for i in order]


def _parts(split: Split) -> list[tuple[int, ...]]:
    return [split.train, split.val, split.test]


def test_split_partitions_all_indices_sorted() -> None:
    labels, groups = _dataset([20, 13, 7])
    split = make_split(labels, groups, seed=3)
    everything = [i for part in _parts(split) for i in part]
    assert sorted(everything) == list(range(len(labels)))
    for part in _parts(split):
        assert list(part) == sorted(part)
    assert split.seed == 3 and split.fractions == (0.6, 0.2, 0.2)


def test_groups_never_cross_parts() -> None:
    labels, groups = _dataset([20, 13, 7], per_group=3)
    split = make_split(labels, groups, seed=1)
    where: dict[str, set[int]] = defaultdict(set)
    for p, part in enumerate(_parts(split)):
        for i in part:
            where[groups[i]].add(p)
    assert all(len(v) == 1 for v in where.values())


@pytest.mark.parametrize("n", [3, 4, 5, 7, 10, 20, 101])
def test_stratified_counts_per_class(n: int) -> None:
    labels, groups = _dataset([n, 10], per_group=1)
    split = make_split(labels, groups, seed=0)
    counts = [Counter(int(labels[i]) for i in part)[0] for part in _parts(split)]
    assert sum(counts) == n and min(counts) >= 1
    # within one group of the exact 6:2:2 share
    for count, frac in zip(counts, (0.6, 0.2, 0.2), strict=True):
        assert abs(count - frac * n) <= 1.0


def test_hand_computed_allocation() -> None:
    # 10 groups: 6 / 2 / 2 exactly; 7 groups: 4.2 / 1.4 / 1.4 -> 4 + remainders .2/.4/.4 -> one more to val
    for n, expected in ((10, [6, 2, 2]), (7, [4, 2, 1]), (3, [1, 1, 1]), (4, [2, 1, 1])):
        labels, groups = _dataset([n], per_group=1)
        split = make_split(labels, groups, seed=5)
        assert [len(p) for p in _parts(split)] == expected, n


def test_deterministic_and_seed_dependent() -> None:
    labels, groups = _dataset([30, 30])
    a = make_split(labels, groups, seed=7)
    assert a == make_split(labels.copy(), list(groups), seed=7)
    assert a.train != make_split(labels, groups, seed=8).train


def test_split_does_not_depend_on_sample_order() -> None:
    labels, groups = _dataset([15, 9], per_group=2, seed=0)
    split = make_split(labels, groups, seed=2)
    perm = np.random.default_rng(9).permutation(len(labels))
    relabelled = make_split(labels[perm], [groups[i] for i in perm], seed=2)
    original_test = {groups[i] for i in split.test}
    assert {groups[perm[i]] for i in relabelled.test} == original_test


def test_custom_fractions() -> None:
    labels, groups = _dataset([20], per_group=1)
    split = make_split(labels, groups, seed=0, fractions=(0.5, 0.25, 0.25))
    assert [len(p) for p in _parts(split)] == [10, 5, 5]
    with pytest.raises(DataError, match="sum to 1"):
        make_split(labels, groups, seed=0, fractions=(0.5, 0.5, 0.5))
    with pytest.raises(DataError, match="positive"):
        make_split(labels, groups, seed=0, fractions=(1.0, 0.0, 0.0))


def test_class_with_too_few_groups_is_named() -> None:
    labels, groups = _dataset([10, 2], per_group=4)
    with pytest.raises(DataError, match="class NV has 2 group"):
        make_split(labels, groups, seed=0, class_names=["MEL", "NV"])
    with pytest.raises(DataError, match="class with label 1 has 2 group"):
        make_split(labels, groups, seed=0)


def test_mixed_label_group_goes_with_its_majority() -> None:
    labels, groups = _dataset([6, 6], per_group=1)
    labels = np.concatenate([labels, [0, 0, 1]])
    groups = groups + ["shared", "shared", "shared"]
    split = make_split(labels, groups, seed=0)
    n = len(labels)
    placed = [p for p, part in enumerate(_parts(split)) if {n - 3, n - 2, n - 1} & set(part)]
    assert len(placed) == 1


def test_labelled_counts_round_and_at_least_one() -> None:
    labels, groups = _dataset([40, 13, 3], per_group=1)
    train = make_split(labels, groups, seed=0).train
    per_class = Counter(int(labels[i]) for i in train)
    for ratio in (0.05, 0.1, 0.3, 0.5, 1.0):
        chosen = labelled_subset(labels, train, ratio, seed=4)
        assert set(chosen) <= set(train) and list(chosen) == sorted(set(chosen))
        got = Counter(int(labels[i]) for i in chosen)
        for c, n in per_class.items():
            assert got[c] == max(1, round(ratio * n)), (ratio, c)


def test_labelled_subset_seeded_and_nested() -> None:
    labels, groups = _dataset([50, 50], per_group=1)
    train = make_split(labels, groups, seed=0).train
    small = labelled_subset(labels, train, 0.1, seed=1)
    assert small == labelled_subset(labels, train, 0.1, seed=1)
    assert small != labelled_subset(labels, train, 0.1, seed=2)
    assert set(small) <= set(labelled_subset(labels, train, 0.5, seed=1))


def test_labelled_subset_errors() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    for ratio in (0.0, -0.1, 1.5):
        with pytest.raises(DataError, match="label ratio"):
            labelled_subset(labels, [0, 1, 3], ratio, seed=0)
    with pytest.raises(DataError, match="label 1 has no training sample"):
        labelled_subset(labels, [0, 1, 2], 0.5, seed=0)


# ---------------------------------------------------------------- save / load


def test_save_load_roundtrip_on_real_pack(tmp_path: Path) -> None:
    images = discover(MILK)
    split = make_split(images.labels(), images.groups(), seed=11, class_names=images.classes)
    path = tmp_path / "run" / "split.json"
    save_split(split, images, path)
    assert load_split(path, images) == split
    record = json.loads(path.read_text())
    first = record["test"][0]
    assert first["path"] == images.relpath(images.samples[first["index"]].path_a)
    assert first["path"].count("/") == 1  # class/<file>: relative, POSIX
    assert not list(path.parent.glob("*.tmp"))


def test_load_detects_changed_data(suffix_tree: Path, tmp_path: Path) -> None:
    images = discover(suffix_tree)
    split = make_split(images.labels(), images.groups(), seed=0)
    path = tmp_path / "split.json"
    save_split(split, images, path)
    gone = images.samples[split.val[0]].path_a
    for p in gone.parent.glob(gone.name.split("__")[0] + "__*"):
        p.unlink()
    with pytest.raises(DataError, match="no longer in the data") as err:
        load_split(path, discover(suffix_tree))
    assert gone.relative_to(suffix_tree).as_posix() in str(err.value)


def test_load_detects_new_samples_and_moved_class(class_tree: Path, tmp_path: Path) -> None:
    images = discover(class_tree)
    split = make_split(images.labels(), images.groups(), seed=0)
    path = tmp_path / "split.json"
    save_split(split, images, path)
    extra = class_tree / "polyps" / "extra.jpg"
    extra.write_bytes(images.samples[0].path_a.read_bytes())
    with pytest.raises(DataError, match="covers 12 samples but the data now has 13"):
        load_split(path, discover(class_tree))
    extra.unlink()
    (class_tree / "adenoma").mkdir()
    moved = images.samples[0].path_a
    moved.rename(class_tree / "adenoma" / moved.name)
    with pytest.raises(DataError, match="classes"):
        load_split(path, discover(class_tree))


def test_load_unreadable_or_missing(class_tree: Path, tmp_path: Path) -> None:
    images = discover(class_tree)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        load_split(tmp_path / "bad.json", images)
    with pytest.raises(DataError, match="does not exist"):
        load_split(tmp_path / "none.json", images)
