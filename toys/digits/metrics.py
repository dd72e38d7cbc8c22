"""Sample-quality metrics for the digits, on scikit-learn's 8x8 features ``(N, 64)``.

- :class:`Scorer.accuracy`: the fraction of samples a classifier trained on the real digits
  (scikit-learn's ``SVC``) assigns to the class they were generated for;
- :func:`frechet_distance`: the Fréchet distance between Gaussians fitted to two feature sets
  (Heusel et al., arXiv 1706.08500, eq. 6: ``|mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})``),
  here in a fixed PCA space of the real digits instead of Inception features;
- :func:`precision_recall`: k-NN precision and recall (Kynkäänniemi et al., arXiv 1904.06991,
  eqs. 1-3): a sample is inside the other set's manifold if it lies within the k-th
  nearest-neighbour radius of one of that set's points.

Class accuracy alone cannot see mean-seeking: a blurry class mean is classified well.
The Fréchet distance and recall can.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg
from scipy.spatial.distance import cdist

__all__ = ["frechet_distance", "precision_recall", "Scorer"]


def _points(name: str, x: object) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or len(a) < 2:
        raise ValueError(f"{name} must be features (N >= 2, D), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or inf")
    return a


def frechet_distance(a: object, b: object) -> float:
    """Fréchet distance between Gaussians fitted to ``a (N, D)`` and ``b (M, D)`` (float64)."""
    a, b = _points("a", a), _points("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must share D, got {a.shape[1]} and {b.shape[1]}")
    mu = a.mean(0) - b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = linalg.sqrtm(s1 @ s2)
    root = np.real(root)  # tiny imaginary parts are round-off of a PSD product
    fd = mu @ mu + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(root)
    return float(max(fd, 0.0))


def _radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
    d = cdist(x, x)
    return np.partition(d, k, axis=1)[:, k]


def _covered(queries: np.ndarray, support: np.ndarray, radii: np.ndarray) -> float:
    """Fraction of ``queries`` within the k-NN ball of some point of ``support``."""
    d = cdist(queries, support)
    return float((d <= radii[None, :]).any(axis=1).mean())


def precision_recall(real: object, fake: object, k: int = 3) -> tuple[float, float]:
    """k-NN precision (fake inside the real manifold) and recall (real inside the fake one)."""
    real, fake = _points("real", real), _points("fake", fake)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and fake must share D, got {real.shape[1]} and {fake.shape[1]}")
    if not (isinstance(k, int) and 1 <= k < min(len(real), len(fake))):
        raise ValueError(f"k must be an int in [1, {min(len(real), len(fake))}), got {k!r}")
    precision = _covered(fake, real, _radii(real, k))
    recall = _covered(real, fake, _radii(fake, k))
    return precision, recall


class Scorer:
    """The fixed judges of one benchmark, fitted once on the real training digits.

    Args:
        train: real digit features ``(N, 64)`` in [0, 16] (:func:`~.data.to_digits`).
        labels: their classes ``(N,)``.
        reference: the held-out real features every sample set is compared with.
        components: PCA dimensions of the Fréchet / k-NN feature space.
        k: neighbours of :func:`precision_recall`.
    """

    def __init__(
        self,
        train: np.ndarray,
        labels: np.ndarray,
        reference: np.ndarray,
        *,
        components: int = 20,
        k: int = 3,
    ) -> None:
        from sklearn.decomposition import PCA
        from sklearn.svm import SVC

        self.classifier = SVC(gamma=0.001, C=10.0).fit(train, labels)
        self.pca = PCA(components, random_state=0).fit(train)
        self.k = k
        self.reference = self.pca.transform(reference)

    def accuracy(self, features: np.ndarray, labels: np.ndarray) -> float:
        """Fraction of ``features`` classified as ``labels``."""
        return float((self.classifier.predict(features) == np.asarray(labels)).mean())

    def __call__(self, features: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Accuracy, Fréchet distance, precision and recall of one sample set."""
        z = self.pca.transform(features)
        precision, recall = precision_recall(self.reference, z, self.k)
        return {
            "accuracy": self.accuracy(features, labels),
            "fd": frechet_distance(z, self.reference),
            "precision": precision,
            "recall": recall,
        }
