"""Evaluation metrics as plain functions of judged labels, expected labels and feature arrays.

Nothing here needs a diffusion model or a judge: ``judged`` and ``expected`` are lists (one entry per image) of
``{head: label}`` dicts, so every metric can be checked on hand-built cases.

- concept rate: fraction of images whose concept head (``style``) reads the prompt's concept label. On the
  erased set that is the erased-concept rate (lower is better after erasure); on the neighbour set it is the
  neighbour-style rate (should stay high).
- content accuracy: fraction of images whose every other expected head (``shape`` and ``colour``) is right; on
  the erased set, whether the object is still drawn once its style is gone.
- accuracy: fraction of images whose every expected head is right (unrelated prompts).
- Frechet distance between two feature sets (Gaussian fit; FID's formula on any features).
"""
from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence

import numpy as np

Labels = Mapping[str, str]

CONCEPT_HEAD = "style"


def _checked(judged: Sequence[Labels], expected: Sequence[Labels]) -> None:
    if len(judged) != len(expected):
        raise ValueError(f"{len(judged)} judged images but {len(expected)} expected labels")


def concept_rate(judged: Sequence[Labels], expected: Sequence[Labels], head: str = CONCEPT_HEAD) -> float | None:
    """Fraction of images judged with the prompt's ``head`` label (over images whose prompt names one)."""
    _checked(judged, expected)
    hits = [j.get(head) == e[head] for j, e in zip(judged, expected) if head in e]
    return float(np.mean(hits)) if hits else None


def content_accuracy(judged: Sequence[Labels], expected: Sequence[Labels], concept_head: str = CONCEPT_HEAD
                     ) -> float | None:
    """Fraction of images whose expected labels other than ``concept_head`` are all judged right."""
    _checked(judged, expected)
    hits = []
    for j, e in zip(judged, expected):
        heads = [h for h in e if h != concept_head and h in j]
        if heads:
            hits.append(all(j[h] == e[h] for h in heads))
    return float(np.mean(hits)) if hits else None


def accuracy(judged: Sequence[Labels], expected: Sequence[Labels]) -> float | None:
    """Fraction of images whose expected labels (on heads the judge has) are all judged right."""
    _checked(judged, expected)
    hits = []
    for j, e in zip(judged, expected):
        heads = [h for h in e if h in j]
        if heads:
            hits.append(all(j[h] == e[h] for h in heads))
    return float(np.mean(hits)) if hits else None


def head_accuracy(judged: Sequence[Labels], expected: Sequence[Labels]) -> dict[str, float]:
    """Accuracy per head, over the images whose prompt names that head."""
    _checked(judged, expected)
    hits: dict[str, list[bool]] = {}
    for j, e in zip(judged, expected):
        for h, label in e.items():
            if h in j:
                hits.setdefault(h, []).append(j[h] == label)
    return {h: float(np.mean(v)) for h, v in hits.items()}


def label_distribution(judged: Sequence[Labels], head: str = CONCEPT_HEAD) -> dict[str, float]:
    """Fraction of images judged as each label of ``head`` (labels never judged are left out)."""
    labels = [j[head] for j in judged if head in j]
    if not labels:
        return {}
    counts = Counter(labels)
    return {label: counts[label] / len(labels) for label in sorted(counts)}


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a [N, D]`` and ``b [M, D]`` (N, M >= 2).

    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2})``, where the last trace is computed as the
    sum of square roots of the eigenvalues of ``S_a^{1/2} S_b S_a^{1/2}`` (symmetric PSD, so the result is real
    and stable even when the covariances are singular, e.g. when N < D). 0 for identical sets.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be [N, D] and [M, D]; got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("a Frechet distance needs at least two samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt)
    return max(value, 0.0)


def set_metrics(judged: Sequence[Labels], expected: Sequence[Labels], concept_head: str = CONCEPT_HEAD) -> dict:
    """Every label metric of one prompt set: n, accuracy, per-head accuracy, concept rate, content accuracy and
    the distribution of judged concept labels."""
    return {
        "n": len(judged),
        "accuracy": accuracy(judged, expected),
        "head_accuracy": head_accuracy(judged, expected),
        "concept_rate": concept_rate(judged, expected, concept_head),
        "content_accuracy": content_accuracy(judged, expected, concept_head),
        "concept_distribution": label_distribution(judged, concept_head),
    }


def headline(sets: Mapping[str, Mapping]) -> dict[str, float | None]:
    """The issue's headline numbers from per-set metrics (None where a set is absent):

    erased_rate (erased set's concept rate), erased_content_accuracy (erased set's content accuracy),
    neighbour_rate (neighbour set's concept rate), unrelated_accuracy (unrelated set's accuracy).
    """
    def get(set_name, key):
        return sets.get(set_name, {}).get(key)

    return {
        "erased_rate": get("erased", "concept_rate"),
        "erased_content_accuracy": get("erased", "content_accuracy"),
        "neighbour_rate": get("neighbour", "concept_rate"),
        "unrelated_accuracy": get("unrelated", "accuracy"),
    }


__all__ = ["concept_rate", "content_accuracy", "accuracy", "head_accuracy", "label_distribution",
           "frechet_distance", "set_metrics", "headline", "CONCEPT_HEAD"]
