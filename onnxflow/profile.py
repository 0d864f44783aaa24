"""A version's reference profile, and drift of live data against it: pure functions.

At registration each version gets a profile of what it was trained on, per feature of
each input, and of its predictions on the validation split (``profile/reference.json`` in
its run). A feature is one column of a table input (``features[12]``), a whole scalar
input, or one channel of an image input (``image[c0]``):

* numeric: the edges of ten quantile bins of the training values and the share in each
  bin (with an open bin below and above);
* categorical (strings, booleans, integers with at most 20 values): the share of each
  value, the rest as ``__other__``;
* image channels: mean and standard deviation, and the quantile bins of the pixel values.

Drift is the Jensen-Shannon distance (base 2) between the reference shares and the live
shares over the same bins: bounded in [0, 1], symmetric, and finite when a bin is empty on
one side (PSI divides by the reference share and takes a log of the ratio, so an empty bin
needs an arbitrary epsilon and the figure has no upper bound). A feature drifts when its
distance passes ``threshold`` (0.1 by default, Evidently's default for this distance), or
the sampling noise of the window when that is higher (:func:`noise_threshold`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

BINS = 10
MAX_CATEGORIES = 20
OTHER = "__other__"
DRIFT_THRESHOLD = 0.1
#: How far into the tail of the sampling noise a distance must be to count (z of a normal:
#: about 1 false alarm in 10,000 feature checks).
NOISE_Z = 3.719
PREDICTION = "prediction"


def features(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every feature of ``inputs`` (per-row arrays, batch first) as a 1-d array of values."""
    out: dict[str, np.ndarray] = {}
    for name, array in inputs.items():
        array = np.asarray(array)
        if array.ndim <= 1:
            out[name] = array.reshape(-1)
        elif array.ndim == 4:  # an image [N, C, H, W] or [N, H, W, C]: a feature a channel
            moved = array if array.shape[1] <= 4 else np.moveaxis(array, 3, 1)
            for c in range(moved.shape[1]):
                out[f"{name}[c{c}]"] = moved[:, c].reshape(-1)
        elif array.ndim == 3 and min(array.shape[1:]) > 4:  # a one-channel image [N, H, W]
            out[f"{name}[c0]"] = array.reshape(-1)
        else:
            flat = array.reshape(array.shape[0], -1)
            if flat.shape[1] == 1:
                out[name] = flat[:, 0]
            else:
                for j in range(flat.shape[1]):
                    out[f"{name}[{j}]"] = flat[:, j]
    return out


def predictions_of(output: np.ndarray) -> np.ndarray:
    """What a model predicted per row: the class of class scores, else the values."""
    output = np.asarray(output)
    if output.dtype.kind == "f" and output.ndim == 2 and output.shape[1] > 1:
        return output.argmax(axis=1)
    return output.reshape(output.shape[0], -1)[:, 0] if output.ndim else output.reshape(-1)


def describe(values: np.ndarray) -> dict:
    """The reference of one feature: numeric bins or categorical shares."""
    values = np.asarray(values).reshape(-1)
    kind = values.dtype.kind
    if kind in "OSUb" or (kind in "iu" and len(np.unique(values)) <= MAX_CATEGORIES):
        keys, counts = np.unique(values.astype(str), return_counts=True)
        order = np.argsort(-counts)[:MAX_CATEGORIES]
        shares = {str(keys[i]): counts[i] / values.size for i in order}
        rest = 1.0 - sum(shares.values())
        if rest > 1e-12:
            shares[OTHER] = rest
        return {"kind": "categorical", "shares": {k: float(v) for k, v in shares.items()}}
    finite = values[np.isfinite(values.astype(np.float64))].astype(np.float64)
    edges = np.unique(np.quantile(finite, np.linspace(0, 1, BINS + 1)[1:-1])) if finite.size else []
    return {
        "kind": "numeric",
        "edges": [float(e) for e in edges],
        "shares": [float(s) for s in numeric_shares(finite, list(edges))],
        "mean": float(finite.mean()) if finite.size else None,
        "std": float(finite.std()) if finite.size else None,
    }


def numeric_shares(values: np.ndarray, edges: list[float]) -> np.ndarray:
    """Share of ``values`` in each bin: below the first edge, between edges, above the last."""
    values = np.asarray(values, np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return counts / max(1, values.size)


def build_profile(inputs: Mapping[str, np.ndarray], predictions: np.ndarray | None) -> dict:
    """The reference profile: every feature of the training ``inputs``, and the
    ``predictions`` on the validation split (a 1-d array) under ``prediction``."""
    profile = {
        "metric": "jensen_shannon_distance",
        "threshold": DRIFT_THRESHOLD,
        "rows": int(next(iter(inputs.values())).shape[0]) if inputs else 0,
        "features": {name: describe(values) for name, values in features(inputs).items()},
    }
    if predictions is not None:
        profile["prediction"] = describe(np.asarray(predictions))
    return profile


def live_shares(reference: dict, values: np.ndarray) -> list[float] | dict[str, float]:
    """The live shares of ``values`` in the bins (or categories) of ``reference``."""
    if reference["kind"] == "numeric":
        return numeric_shares(values, reference["edges"]).tolist()
    keys, counts = np.unique(np.asarray(values).reshape(-1).astype(str), return_counts=True)
    total = max(1, int(counts.sum()))
    known = set(reference["shares"]) - {OTHER}
    shares = {k: 0.0 for k in reference["shares"]}
    for key, count in zip(keys, counts):
        target = key if key in known else OTHER
        shares[target] = shares.get(target, 0.0) + count / total
    return shares


def js_distance(reference: dict, live: list[float] | dict[str, float]) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between reference and live shares."""
    if reference["kind"] == "numeric":
        p, q = np.asarray(reference["shares"]), np.asarray(live)
    else:
        keys = sorted(set(reference["shares"]) | set(live))
        p = np.array([reference["shares"].get(k, 0.0) for k in keys])
        q = np.array([live.get(k, 0.0) for k in keys])
    if q.sum() <= 0 or p.sum() <= 0:
        return 0.0
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / m[mask])))

    return math.sqrt(max(0.0, (kl(p) + kl(q)) / 2))


def noise_threshold(bins: int, rows: int, reference_rows: int, z: float = NOISE_Z) -> float:
    """The distance two samples of one distribution stay under with probability ~Φ(z):
    JS divergence ≈ χ²(bins-1) (1/rows + 1/reference_rows) / (8 ln 2) for small differences,
    with χ²'s quantile by Wilson-Hilferty. Small windows are noisy: a fixed threshold would
    flag them by chance."""
    k = max(1, bins - 1)
    chi2 = k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3
    scale = 1 / max(1, rows) + 1 / max(1, reference_rows)
    return math.sqrt(chi2 * scale / (8 * math.log(2)))


def drift(profile: dict, inputs: Mapping[str, np.ndarray], predictions=None) -> dict:
    """Per feature (and the predictions) the distance of live data from the profile, the
    features past their threshold (the profile's, or the sampling noise of a small window
    when that is higher), and their share."""
    base = profile.get("threshold", DRIFT_THRESHOLD)
    reference_rows = profile.get("rows", 0) or 10**9
    live = features(inputs)
    distances, thresholds = {}, {}
    for name, ref in profile["features"].items():
        if name not in live:
            continue
        distances[name] = js_distance(ref, live_shares(ref, live[name]))
        rows = np.asarray(live[name]).size
        thresholds[name] = max(base, noise_threshold(len(ref["shares"]), rows, reference_rows))
    drifted = sorted(n for n, d in distances.items() if d > thresholds[n])
    result = {
        "metric": "jensen_shannon_distance",
        "threshold": base,
        "thresholds": thresholds,
        "features": distances,
        "drifted": drifted,
        "drift_share": len(drifted) / len(distances) if distances else 0.0,
    }
    if predictions is not None and "prediction" in profile:
        ref = profile["prediction"]
        result["prediction"] = js_distance(ref, live_shares(ref, np.asarray(predictions)))
    return result


def profile_model(model_path, train: Mapping[str, np.ndarray], validation) -> dict:
    """The profile of a model file: ``train`` per input, and its onnxruntime predictions
    (first output) on the ``validation`` inputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    train, validation = _named(train, names), _named(validation, names)
    outputs = session.run(None, {k: np.asarray(v) for k, v in validation.items()})
    return build_profile(train, predictions_of(outputs[0]))


def _named(inputs, names: list[str]) -> dict[str, np.ndarray]:
    if isinstance(inputs, Mapping):
        return dict(inputs)
    return {names[0]: np.asarray(inputs)}
