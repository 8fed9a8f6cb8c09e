"""Dirichlet partitions and the partition files silos load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from silo_node.partition import PartitionError, dirichlet_partition, write_partitions
from silo_node.tabular import TaskError
from silo_node.tasks import get_task

LABELS = np.repeat(np.arange(4), 250)  # 4 balanced classes, 1000 samples


def class_distributions(labels: np.ndarray, parts: list[np.ndarray], n_classes: int) -> np.ndarray:
    counts = np.stack([np.bincount(labels[p], minlength=n_classes) for p in parts])
    return counts / counts.sum(axis=1, keepdims=True)


def max_total_variation(dist: np.ndarray) -> float:
    """Largest total-variation distance between two parts' class distributions."""
    return max(0.5 * np.abs(a - b).sum() for a in dist for b in dist)


def test_parts_are_disjoint_and_cover_every_index() -> None:
    parts = dirichlet_partition(LABELS, 5, 0.5, seed=0)
    assert len(parts) == 5
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS)
    assert np.array_equal(np.sort(joined), np.arange(len(LABELS)))
    for p in parts:
        assert p.dtype == np.int64
        assert np.array_equal(p, np.sort(p))


def test_partition_is_deterministic_for_a_seed() -> None:
    a = dirichlet_partition(LABELS, 4, 0.5, seed=11)
    b = dirichlet_partition(LABELS, 4, 0.5, seed=11)
    c = dirichlet_partition(LABELS, 4, 0.5, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_small_alpha_skews_labels_and_large_alpha_does_not() -> None:
    skewed = class_distributions(LABELS, dirichlet_partition(LABELS, 5, 0.1, seed=0), 4)
    near_iid = class_distributions(LABELS, dirichlet_partition(LABELS, 5, 1000.0, seed=0), 4)
    assert max_total_variation(skewed) > 0.5
    assert max_total_variation(near_iid) < 0.15
    # with alpha 0.1 some silo is dominated by one class
    assert skewed.max() > 0.6


def test_every_part_has_at_least_min_size() -> None:
    for seed in range(5):
        parts = dirichlet_partition(LABELS, 8, 0.1, seed=seed, min_size=30)
        assert min(len(p) for p in parts) >= 30


def test_one_part_takes_everything() -> None:
    (only,) = dirichlet_partition(LABELS, 1, 0.5, seed=0)
    assert np.array_equal(only, np.arange(len(LABELS)))


def test_impossible_requests_raise() -> None:
    with pytest.raises(PartitionError) as exc:
        dirichlet_partition(LABELS, 11, 0.5, seed=0, min_size=100)
    assert exc.value.reason == "unsatisfiable"
    assert "1000 samples cannot give 11 parts of at least 100" in exc.value.message
    with pytest.raises(PartitionError) as exc:
        dirichlet_partition(LABELS, 10, 0.01, seed=0, min_size=99, max_attempts=3)
    assert exc.value.reason == "unsatisfiable"
    assert "raise alpha" in exc.value.message


@pytest.mark.parametrize(
    ("labels", "n_parts", "alpha", "min_size"),
    [
        (LABELS, 0, 0.5, 1),
        (LABELS, 2, 0.0, 1),
        (LABELS, 2, float("nan"), 1),
        (LABELS, 2, 0.5, -1),
        (LABELS.astype(float), 2, 0.5, 1),
        (LABELS.reshape(2, -1), 2, 0.5, 1),
    ],
)
def test_invalid_arguments_raise(labels: np.ndarray, n_parts: int, alpha: float, min_size: int) -> None:
    with pytest.raises(PartitionError) as exc:
        dirichlet_partition(labels, n_parts, alpha, seed=0, min_size=min_size)
    assert exc.value.reason == "invalid_argument"


# --- partition files -----------------------------------------------------------------


def test_written_partitions_load_as_silo_data(tmp_path: Path) -> None:
    result = write_partitions("breast_cancer", tmp_path / "parts", 3, alpha=0.5, seed=0, holdout_fraction=0.2)
    task = get_task("breast_cancer")
    assert [p.name for p in result.paths] == ["silo-1.csv", "silo-2.csv", "silo-3.csv"]
    assert result.holdout_path.name == "holdout.csv"
    loaded = [task.load_data(p, "target") for p in result.paths]
    holdout = task.load_data(result.holdout_path, "target")
    for data, counts in zip(loaded, result.label_counts):
        assert len(data) >= 10
        values, freq = np.unique(data.labels.numpy(), return_counts=True)
        assert dict(zip(values.tolist(), freq.tolist())) == counts
    # holdout: 20% of each class (212 malignant, 357 benign), given to no silo
    assert len(holdout) == round(212 * 0.2) + round(357 * 0.2)
    assert sum(len(d) for d in loaded) + len(holdout) == 569
    # the files hold exactly the bundled rows (float64 text round-trips exactly)
    bundled = task.load_data(None)
    every = torch.cat([d.features for d in [*loaded, holdout]])
    as_rows = sorted(map(tuple, every.tolist()))
    assert as_rows == sorted(map(tuple, bundled.features.tolist()))


def test_written_partitions_are_deterministic_and_skewed(tmp_path: Path) -> None:
    a = write_partitions("digits", tmp_path / "a", 4, alpha=0.1, seed=5)
    b = write_partitions("digits", tmp_path / "b", 4, alpha=0.1, seed=5)
    for pa, pb in zip([*a.paths, a.holdout_path], [*b.paths, b.holdout_path]):
        assert pa.read_bytes() == pb.read_bytes()
    dist = np.array([[c.get(k, 0) for k in range(10)] for c in a.label_counts], dtype=float)
    dist /= dist.sum(axis=1, keepdims=True)
    assert max_total_variation(dist) > 0.5
    header = a.paths[0].read_text().splitlines()[0].split(",")
    assert header[0] == "pixel_0_0" and header[-1] == "target" and len(header) == 65


def test_partitions_need_a_task_with_bundled_data(tmp_path: Path) -> None:
    with pytest.raises(TaskError) as exc:
        write_partitions("csv", tmp_path, 2, options={"classes": 2, "feature_names": ["a", "b"]})
    assert exc.value.reason == "no_data"


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5])
def test_holdout_fraction_must_be_a_proper_fraction(tmp_path: Path, fraction: float) -> None:
    with pytest.raises(PartitionError) as exc:
        write_partitions("breast_cancer", tmp_path, 2, holdout_fraction=fraction)
    assert exc.value.reason == "invalid_argument"
    assert not any(tmp_path.iterdir())
