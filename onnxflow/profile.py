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

from collections.abc import Mapping

import numpy as np

from onnxflow.serving.drift import (  # noqa: F401  (this module's API)
    DRIFT_THRESHOLD,
    NOISE_Z,
    OTHER,
    features,
    js_distance,
    live_shares,
    noise_threshold,
    numeric_shares,
    predictions_of,
)

BINS = 10
MAX_CATEGORIES = 20
PREDICTION = "prediction"
#: Rows of the validation split kept as the version's reference sample (the monitor's
#: Evidently report compares a window with it): bounded, whatever the data set's size.
REFERENCE_ROWS = 2000


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
    return profile_and_sample(model_path, train, validation)[0]


def profile_and_sample(
    model_path, train: Mapping[str, np.ndarray], validation
) -> tuple[dict, dict[str, np.ndarray]]:
    """The profile (:func:`profile_model`) and the reference sample: at most
    ``REFERENCE_ROWS`` rows of ``validation`` as row features (:func:`row_features`) with
    the model's prediction on each (``prediction``)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    train, validation = _named(train, names), _named(validation, names)
    outputs = session.run(None, {k: np.asarray(v) for k, v in validation.items()})
    predictions = predictions_of(outputs[0])
    profile = build_profile(train, predictions)
    rows = len(predictions)
    keep = np.sort(np.random.default_rng(0).permutation(rows)[:REFERENCE_ROWS])
    sample = row_features({k: np.asarray(v)[keep] for k, v in validation.items()})
    sample[PREDICTION] = np.asarray(predictions)[keep]
    return profile, sample


def row_features(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One value per row and feature, for row-wise tools (Evidently): the features of
    :func:`features`, except that an image channel is the row's mean of that channel."""
    out: dict[str, np.ndarray] = {}
    for name, array in inputs.items():
        array = np.asarray(array)
        if array.ndim == 4 or (array.ndim == 3 and min(array.shape[1:]) > 4):
            moved = array[:, None] if array.ndim == 3 else array
            moved = moved if moved.shape[1] <= 4 else np.moveaxis(moved, 3, 1)
            for c in range(moved.shape[1]):
                out[f"{name}[c{c}]"] = moved[:, c].reshape(len(moved), -1).mean(axis=1)
        else:
            out.update(features({name: array}))
    return out


def _named(inputs, names: list[str]) -> dict[str, np.ndarray]:
    if isinstance(inputs, Mapping):
        return dict(inputs)
    return {names[0]: np.asarray(inputs)}
