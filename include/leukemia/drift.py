"""Does a scoring batch look like the images the champion was trained on? Batch drift and per-image
out-of-distribution scores, both on the frozen VGG16 pooled features the head takes as input.

A model trained on one laboratory's smears meets other stains, microscopes and cameras; nothing in
its probabilities says so. Two checks, both against a small `Reference` stored with the registered
version (a sample of its training features and a summary of them):

1. **Batch drift** (`batch_drift`): a classifier two-sample test (Lopez-Paz & Oquab 2017,
   "Revisiting classifier two-sample tests"). The reference sample is labelled 0, the batch 1; a
   classifier's stratified k-fold out-of-fold ROC AUC is the statistic (0.5: the classifier cannot
   tell them apart), its p-value the share of label permutations that score as high. The classifier
   is a ridge (least-squares) classifier on the reference-standardised features z and |z| (a moved
   mean and a changed spread), solved in its dual form (≤ 550 rows < 5,120 columns): per fold one
   Cholesky solve gives a matrix that maps *any* labelling to out-of-fold scores, so the observed
   labels and all permutations are one matrix product. The labels are permuted within each fold,
   which keeps the folds stratified and the test exact under exchangeability (the permuted
   labellings are uniform over those with the same per-fold class counts, as the observed one is
   under the null). A batch of 50 against 500 reference vectors of width 2,560 with 500 permutations
   takes 0.1-0.2 s on one core; a standardised logistic regression takes longer for one 5-fold
   cross-validation than this whole test, and would need it 501 times (bench/drift.py measures both
   and compares their AUCs).
2. **Per-image OOD score** (`ood_scores`, `ood_flags`): the Mahalanobis distance under a
   probabilistic PCA covariance (Tipping & Bishop 1999) of the standardised training features: the
   top `OOD_COMPONENTS` principal directions with their own variances, the rest of the space with
   one isotropic (average) variance. With ~1,600 training images in 2,560 dimensions the sample
   covariance is singular; PPCA is the regularised inverse covariance that keeps the energy *off*
   the training subspace in the score (a PCA-reduced Mahalanobis distance alone cannot see a stain
   that moves features out of that subspace). The threshold is the conformal ⌈(n+1)(1-fpr)⌉/n
   quantile of cross-fitted scores: each training image scored by a PPCA fitted without its fold, so
   the stated false-positive rate holds for new in-distribution images (real images, fpr 1 %: 1.1 %
   of the test split and of the validation split flagged). On the real shifts it flags as many
   images as a k-nearest-neighbour distance to the sample (tried: k 1-20, plain or cosine), for no
   more storage than the basis; 8-128 components gave the same false-positive rate. Per image, only
   a gross shift stands out (the synthetic smears: ~60 %); a stain, blur or lighting change that
   every image of a batch shares is the batch test's to find.

The constants below are the defaults of the functions; a deployment sets the sample size, the OOD
false-positive rate, the smallest batch and the level through `config.ENV_DEFAULTS`
(`LEUKEMIA_DRIFT_*`, `LEUKEMIA_OOD_FPR`), which `watch.py` (the scoring side) reads.

Pure numpy/scikit-learn, imported inside the functions: no model, no storage but `save`/`load`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

#: Training feature vectors kept in a `Reference` (a seeded random sample).
REFERENCE_SAMPLE = 500
#: Share of in-distribution images the OOD threshold flags.
OOD_FPR = 0.01
#: Principal directions with their own variance in the OOD score (the rest: one average variance).
OOD_COMPONENTS = 32
#: Folds of the cross-fitted OOD threshold.
OOD_FOLDS = 5
#: Below this many images a batch gets no drift decision (per-image scores are still given).
MIN_BATCH = 20
#: Significance level of the drift test.
DRIFT_ALPHA = 0.01
#: Label permutations of the drift test (the smallest p-value is 1 / (PERMUTATIONS + 1)).
PERMUTATIONS = 500
#: Folds of the two-sample classifier's cross-validation (fewer when the batch is smaller).
CV_FOLDS = 5
#: Reference vectors per batch image in the two-sample test (at most the stored sample).
REFERENCE_RATIO = 10
#: Ridge penalty of the two-sample classifier, relative to the mean squared norm of a row.
RIDGE = 0.1
#: Version of the .npz layout written by `Reference.save`.
REFERENCE_FORMAT = 1
#: Above this many images and units the OOD score's PCA is a randomized SVD, else exact.
EXACT_LIMIT = 600
#: Floor of a unit's standard deviation, relative to the median one (dead units are switched off).
RELATIVE_FLOOR = 0.1

DRIFT = "drift"
NO_DRIFT = "no drift"


def _standardiser(x: Any) -> tuple[Any, Any]:
    """Mean and scale of each unit; a unit that never varies gets a huge scale (it says nothing),
    tiny ones are floored at `RELATIVE_FLOOR` of the median, as `model.adapted_normalization`
    does (at a tenth, not a hundredth: a rarely firing unit must not dominate a distance)."""
    import numpy as np

    mean, std = x.mean(axis=0), x.std(axis=0)
    live = std > 1e-6
    floor = RELATIVE_FLOOR * float(np.median(std[live])) if live.any() else 1.0
    return mean, np.where(live, np.maximum(std, floor), 1e6)


def _top_directions(z: Any, k: int, seed: int) -> tuple[Any, Any]:
    """The top k right singular vectors (k, d) and singular values of the centred rows `z`: exact
    from the smaller Gram or covariance matrix when that is small, else a seeded randomized SVD."""
    import numpy as np

    n, d = z.shape
    if min(n, d) > EXACT_LIMIT:
        from sklearn.utils.extmath import randomized_svd

        _, singular, basis = randomized_svd(z, k, random_state=seed)
        return basis, singular
    values, vectors = np.linalg.eigh(z @ z.T if n < d else z.T @ z)
    values, vectors = np.maximum(values[::-1][:k], 1e-12), vectors[:, ::-1][:, :k]
    basis = (z.T @ vectors / np.sqrt(values)).T if n < d else vectors.T
    return basis, np.sqrt(values)


def _fit_ppca(x: Any, components: int, seed: int) -> dict[str, Any]:
    """Standardiser + PPCA (centre, basis, variances, noise variance) of the rows of `x`.

    The noise variance is Tipping & Bishop's maximum likelihood estimate: the variance left over,
    spread over the d - k other dimensions (not over the n - 1 - k that n < d images span: the
    score's scale must not depend on n, or the threshold fitted on the folds would not fit the
    model fitted on all images)."""
    mean, scale = _standardiser(x)
    z = (x - mean) / scale
    centre = z.mean(axis=0)
    z = z - centre
    n, d = z.shape
    k = max(1, min(components, n - 2, d - 1))
    basis, singular = _top_directions(z, k, seed)
    variances = singular**2 / (n - 1)
    rest = float((z * z).sum()) / (n - 1) - float(variances.sum())
    return {
        "mean": mean.astype("float32"),
        "scale": scale.astype("float32"),
        "components": basis.astype("float32"),
        "variances": variances.astype("float32"),
        "centre": centre.astype("float32"),
        "noise": max(rest / (d - k), 1e-6),
    }


def _ppca_distance(model: dict[str, Any], x: Any) -> Any:
    """Mahalanobis distance of each row under the PPCA covariance of `model`."""
    import numpy as np

    z = (np.asarray(x, dtype="float64") - model["mean"]) / model["scale"] - model["centre"]
    coords = z @ np.asarray(model["components"], dtype="float64").T
    residual = np.maximum((z * z).sum(axis=1) - (coords * coords).sum(axis=1), 0.0)
    inside = (coords * coords / model["variances"]).sum(axis=1)
    return np.sqrt(inside + residual / float(model["noise"]))


def stratified_folds(labels: Any, k: int, seed: int) -> Any:
    """Fold number (0..k-1) of each row: each class dealt round-robin in a seeded random order."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    folds = np.empty(len(labels), dtype="int64")
    for value in np.unique(labels):
        rows = np.flatnonzero(labels == value)
        folds[rng.permutation(rows)] = (np.arange(len(rows)) + int(rng.integers(k))) % k
    return folds


def conformal_quantile(scores: Any, level: float) -> float:
    """The ⌈(n+1)·level⌉-th smallest score (inf when n is too small for the level)."""
    import numpy as np

    s = np.sort(np.asarray(scores, dtype="float64"))
    rank = math.ceil((len(s) + 1) * level)
    return float(s[rank - 1]) if rank <= len(s) else math.inf


@dataclass
class Reference:
    """What a registered model version keeps to judge drift: a seeded random sample of at most
    `REFERENCE_SAMPLE` training feature vectors (float16), the OOD score's PPCA (standardiser,
    `OOD_COMPONENTS` directions and variances, noise variance) and its threshold.

    One .npz (`save`, uncompressed so its size is known): for 500 × 2,560 (`multiscale`) it is
    2,925,788 bytes (2.8 MiB: the sample 2.56 MB, the PPCA basis 0.33 MB); for 500 × 512 (`seed`)
    591,068 bytes.
    """

    sample: Any  # (m, d) float16: training features
    sample_labels: Any  # (m,) int: their classes
    mean: Any  # (d,) float32: standardiser
    scale: Any  # (d,) float32
    components: Any  # (k, d) float32: PPCA basis in the standardised space
    variances: Any  # (k,) float32
    centre: Any  # (d,) float32: PCA mean in the standardised space
    noise: float
    threshold: float  # OOD distance above which an image is flagged
    fpr: float
    n_train: int
    seed: int

    @classmethod
    def fit(
        cls,
        features: Any,
        labels: Any,
        sample: int = REFERENCE_SAMPLE,
        fpr: float = OOD_FPR,
        seed: int = 0,
        components: int = OOD_COMPONENTS,
        folds: int = OOD_FOLDS,
    ) -> Reference:
        """The reference of a model trained on `features` (n, d) with class `labels` (n,). Fewer
        than ⌈(n+1)(1-fpr)⌉ ≤ n images cannot place the OOD threshold at `fpr`: it is then inf
        (`ood_limited`), no image is flagged, and the batch test still works."""
        import numpy as np
        from threadpoolctl import threadpool_limits

        x = np.asarray(features, dtype="float64")
        y = np.asarray(labels)
        if x.ndim != 2 or len(x) != len(y):
            raise ValueError(f"features must be (n, d) with n labels, got {x.shape} and {y.shape}")
        if not 0 < fpr < 1 or len(x) < 2 * folds:
            raise ValueError(
                f"need fpr in (0, 1) and at least {2 * folds} training images, got fpr {fpr} and "
                f"{len(x)} images"
            )
        fold = stratified_folds(y, folds, seed)
        held_back = np.empty(len(x))
        # one BLAS thread: 1 s instead of 15 s for 1,565 × 2,560 on a busy 2-core machine
        with threadpool_limits(1):
            for f in range(folds):
                model = _fit_ppca(x[fold != f], components, seed)
                held_back[fold == f] = _ppca_distance(model, x[fold == f])
            model = _fit_ppca(x, components, seed)
        rows = np.sort(np.random.default_rng(seed).permutation(len(x))[:sample])
        return cls(
            sample=x[rows].astype("float16"),
            sample_labels=y[rows].astype("int64"),
            **{k: v for k, v in model.items() if k != "noise"},
            noise=float(model["noise"]),
            threshold=conformal_quantile(held_back, 1 - fpr),
            fpr=float(fpr),
            n_train=len(x),
            seed=int(seed),
        )

    @property
    def ood_limited(self) -> bool:
        """True when too few training images set an OOD threshold (no image is ever flagged)."""
        return not math.isfinite(self.threshold)

    @property
    def width(self) -> int:
        """Length of the feature vectors this reference judges."""
        return int(self.sample.shape[1])

    def ppca(self) -> dict[str, Any]:
        """The OOD score's model, as `_ppca_distance` takes it."""
        names = ("mean", "scale", "components", "variances", "centre", "noise")
        return {name: getattr(self, name) for name in names}

    def to_bytes(self) -> bytes:
        """The uncompressed .npz of `save` (for an artifact store or an object store)."""
        import io

        import numpy as np

        buffer = io.BytesIO()
        np.savez(buffer, format=np.int64(REFERENCE_FORMAT), **asdict(self))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "the data") -> Reference:
        """Read the .npz bytes of `to_bytes`; `source` names them in errors."""
        import io

        import numpy as np

        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            if "format" not in arrays or int(arrays["format"]) != REFERENCE_FORMAT:
                raise ValueError(
                    f"{source} is not a drift reference of format {REFERENCE_FORMAT}: "
                    "refit it with Reference.fit on the model's training features"
                )
            values = {f.name: arrays[f.name] for f in fields(cls)}
        for name in ("noise", "threshold", "fpr"):
            values[name] = float(values[name])
        for name in ("n_train", "seed"):
            values[name] = int(values[name])
        return cls(**values)

    def save(self, path: str | Path) -> int:
        """Write one .npz file; returns its size in bytes."""
        data = self.to_bytes()
        Path(path).write_bytes(data)
        return len(data)

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        """Read a .npz file written by `save`."""
        return cls.from_bytes(Path(path).read_bytes(), str(path))


def _check_width(reference: Reference, features: Any) -> Any:
    """The features as float64 (n, d), or a clear error when d is not the reference's."""
    import numpy as np

    x = np.asarray(features, dtype="float64")
    if x.ndim != 2 or x.shape[1] != reference.width:
        raise ValueError(
            f"features must be (n, {reference.width}) like the reference's, got {x.shape}: "
            "score with the feature variant the model was trained on"
        )
    return x


def ood_scores(reference: Reference, features: Any) -> Any:
    """Each image's distance to the training features (PPCA Mahalanobis; see the module doc)."""
    return _ppca_distance(reference.ppca(), _check_width(reference, features))


def ood_flags(reference: Reference, features: Any) -> Any:
    """True for each image farther from the training features than the reference's threshold."""
    return ood_scores(reference, features) > reference.threshold


@dataclass(frozen=True)
class DriftResult:
    """One batch's two-sample test: out-of-fold AUC, permutation p-value and the decision."""

    statistic: float | None  # ROC AUC of reference (0) vs batch (1); 0.5: indistinguishable
    p_value: float | None
    decision: str  # DRIFT, NO_DRIFT or "too few images (n < …): no decision"
    n: int  # batch images
    n_reference: int = 0  # reference vectors it was compared with
    class_matched: bool = False  # the reference side drawn with the batch's predicted class mix
    alpha: float = DRIFT_ALPHA
    folds: int = 0
    permutations: int = 0
    seconds: float = 0.0

    @property
    def drifted(self) -> bool:
        """True when the batch differs from the training features at level alpha."""
        return self.decision == DRIFT

    def summary(self) -> str:
        """One line for the run's log, the ledger and the scoring output."""
        if self.statistic is None:
            return f"drift watch: {self.decision} ({self.n} images)"
        return (
            f"drift watch: {self.decision}: AUC {self.statistic:.3f}, p {self.p_value:.4f} "
            f"(alpha {self.alpha:g}; {self.n} images vs {self.n_reference} "
            f"{'class-matched ' if self.class_matched else ''}training features, "
            f"{self.folds}-fold, {self.permutations} permutations)"
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain values (XCom, the ledger, JSON)."""
        return asdict(self)


def _fold_operators(gram: Any, folds: Any, k: int, ridge: float) -> list[tuple[Any, Any, Any]]:
    """Per fold (test rows, train rows, A): A maps train labels to the test rows' ridge scores
    (the dual ridge with a fold-centred linear kernel and an unpenalised intercept)."""
    import numpy as np
    from scipy.linalg import cho_factor, cho_solve

    out = []
    for f in range(k):
        test, train = np.flatnonzero(folds == f), np.flatnonzero(folds != f)
        k_tt, k_et = gram[np.ix_(train, train)], gram[np.ix_(test, train)]
        col = k_tt.mean(axis=0)
        centred_tt = k_tt - col[None, :] - col[:, None] + col.mean()
        centred_et = k_et - k_et.mean(axis=1, keepdims=True) - col[None, :] + col.mean()
        penalty = ridge * float(np.trace(centred_tt)) / len(train)
        factor = cho_factor(centred_tt + penalty * np.eye(len(train)))
        out.append((test, train, cho_solve(factor, centred_et.T).T))
    return out


def _auc_columns(scores: Any, labels: Any) -> Any:
    """ROC AUC of each column of `scores` against the 0/1 column of `labels` (ties: half)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, axis=0)
    positives = labels.sum(axis=0)
    negatives = len(labels) - positives
    return ((ranks * labels).sum(axis=0) - positives * (positives + 1) / 2) / (
        positives * negatives
    )


def _within_fold_permutations(labels: Any, folds: Any, permutations: int, seed: int) -> Any:
    """(n, 1 + permutations): the labels, then `permutations` shuffles of them within each fold."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = np.repeat(labels[:, None], permutations + 1, axis=1).astype("float64")
    for f in np.unique(folds):
        rows = np.flatnonzero(folds == f)
        out[rows, 1:] = rng.permuted(out[rows, 1:], axis=0)
    return out


def _reference_rows(
    reference: Reference, n: int, classes: Any | None, ratio: float, rng: Any
) -> Any:
    """Rows of the stored sample to set against a batch of n: `ratio` × n at random or, given the
    batch's predicted classes, the batch's class mix (as many per class as the scarcest class
    allows, at most `ratio` × n in all; classes the sample lacks are left out of the match)."""
    import numpy as np

    size = len(reference.sample)
    if classes is None:
        return np.sort(rng.permutation(size)[: min(size, max(1, round(ratio * n)))])
    classes = np.asarray(classes)
    if len(classes) != n:
        raise ValueError(f"classes must give one class per batch image: {len(classes)} for {n}")
    labels = np.asarray(reference.sample_labels)
    have = {c: np.flatnonzero(labels == c) for c in np.unique(classes)}
    want = {c: int((classes == c).sum()) for c, rows in have.items() if len(rows)}
    if not want:
        return _reference_rows(reference, n, None, ratio, rng)
    scale = min(ratio, *(len(have[c]) / k for c, k in want.items()))
    picked = [rng.permutation(have[c])[: max(1, int(scale * k))] for c, k in want.items()]
    return np.sort(np.concatenate(picked))


def _cross_validated_aucs(
    z: Any, labels: Any, folds: int, permutations: int, ridge: float, seed: int
) -> Any:
    """Out-of-fold ROC AUC of the ridge classifier for the labels, then for each permutation."""
    import numpy as np

    fold = stratified_folds(labels, folds, seed)
    ys = _within_fold_permutations(labels, fold, permutations, seed)
    scores = np.empty_like(ys)
    gram = np.asarray(z @ z.T, dtype="float64")
    for test, train, operator in _fold_operators(gram, fold, folds, ridge):
        scores[test] = operator @ ys[train]
    return _auc_columns(scores, ys)


def batch_drift(
    reference: Reference,
    features: Any,
    classes: Any | None = None,
    min_batch: int = MIN_BATCH,
    alpha: float = DRIFT_ALPHA,
    permutations: int = PERMUTATIONS,
    folds: int = CV_FOLDS,
    ratio: float = REFERENCE_RATIO,
    ridge: float = RIDGE,
    spread: bool = True,
    seed: int = 0,
) -> DriftResult:
    """Classifier two-sample test of a batch's features (n, d) against the reference sample.

    The reference side is a seeded subsample of at most `ratio` × n stored vectors: more reference
    vectors than batch images estimate the training distribution better, and the power keeps
    growing up to the whole sample of 500 (the real images' one-laboratory stain shift of
    bench/drift.py, 30 batches of 50: found in 37 % at 1×, 80 % at 4×, 100 % at 10×), so the
    default uses it all for batches up to 50; the cap only bounds the cost for small batches.
    `classes` (the model's predicted class of each image), when given, draws the reference side
    with the batch's class mix: a batch of one patient's smear is all one class, and unmatched that
    class-prior shift alone is "drift" (every single-class batch of the real images is flagged).
    With `spread` the classifier sees each standardised unit z and |z|: z shows a moved mean, |z| a
    changed spread about the training mean (a scale or covariance shift with the same mean, which a
    linear classifier on z alone cannot see).
    """
    import time

    import numpy as np
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    x = _check_width(reference, features)
    n = len(x)
    if n < min_batch:
        return DriftResult(None, None, f"too few images (n < {min_batch}): no decision", n)
    rows = _reference_rows(reference, n, classes, ratio, np.random.default_rng(seed))
    z = ((np.vstack([reference.sample[rows], x]) - reference.mean) / reference.scale).astype(
        "float32"
    )
    if spread:
        z = np.hstack([z, np.abs(z)])
    labels = np.r_[np.zeros(len(rows)), np.ones(n)]
    k = max(2, min(folds, n, len(rows)))
    # one BLAS thread: small matrices, where threads cost more than they give (0.1 s instead of
    # 0.4 s for 50 against 500 × 2,560 on a busy 2-core machine)
    with threadpool_limits(1):
        aucs = _cross_validated_aucs(z, labels, k, permutations, ridge, seed)
    p = float((1 + np.sum(aucs[1:] >= aucs[0])) / (1 + permutations))
    return DriftResult(
        statistic=float(aucs[0]),
        p_value=p,
        decision=DRIFT if p <= alpha else NO_DRIFT,
        n=n,
        n_reference=len(rows),
        class_matched=classes is not None,
        alpha=alpha,
        folds=k,
        permutations=permutations,
        seconds=round(time.perf_counter() - started, 4),
    )
