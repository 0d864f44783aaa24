"""Drift of live data against a version's reference profile: the pure-numpy part that
the endpoint and the steps share (:mod:`onnxflow.profile` builds profiles and imports these).

A feature is one column of a table input, a whole scalar input, or one channel of an image
input; the distance is Jensen-Shannon (base 2, in [0, 1]) over the profile's bins.
:class:`LiveDrift` keeps a served version's streaming histograms on those bins: an O(rows)
``bincount`` per feature and request, the distances computed only when read (a scrape of
``/metrics`` or ``/admin/status``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping

import numpy as np

OTHER = "__other__"
DRIFT_THRESHOLD = 0.1
#: How far into the tail of the sampling noise a distance must be to count (z of a normal:
#: about 1 false alarm in 10,000 feature checks).
NOISE_Z = 3.719


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


def numeric_shares(values: np.ndarray, edges: list[float]) -> np.ndarray:
    """Share of ``values`` in each bin: below the first edge, between edges, above the last."""
    values = np.asarray(values, np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return counts / max(1, values.size)


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


#: The file beside a cached version's model files holding its reference profile.
PROFILE_FILE = "onnxflow_profile.json"


class LiveDrift:
    """Streaming histograms of one served version's live inputs and predictions on the bins
    of its reference profile, and their distances from it."""

    def __init__(self, profile: dict) -> None:
        self.profile = profile
        self.base = float(profile.get("threshold", DRIFT_THRESHOLD))
        self.reference_rows = int(profile.get("rows", 0) or 10**9)
        self.rows = 0
        self._lock = threading.Lock()
        self._counts = {n: self._empty(ref) for n, ref in profile.get("features", {}).items()}
        self._prediction = profile.get("prediction")
        self._prediction_counts = self._empty(self._prediction) if self._prediction else None

    @staticmethod
    def _empty(reference: dict):
        if reference["kind"] == "numeric":
            return np.zeros(len(reference["edges"]) + 1, np.int64)
        return dict.fromkeys(reference["shares"], 0)

    @staticmethod
    def _add(reference: dict, counts, values: np.ndarray) -> None:
        if reference["kind"] == "numeric":
            values = np.asarray(values, np.float64).reshape(-1)
            values = values[np.isfinite(values)]
            found = np.searchsorted(reference["edges"], values, side="right")
            counts += np.bincount(found, minlength=counts.size)
            return
        keys, seen = np.unique(np.asarray(values).reshape(-1).astype(str), return_counts=True)
        for key, n in zip(keys.tolist(), seen.tolist()):
            target = key if key in counts and key != OTHER else OTHER
            counts[target] = counts.get(target, 0) + n

    def observe(self, inputs: Mapping[str, np.ndarray], outputs: list[np.ndarray]) -> None:
        """Add one answered request (its checked feeds and the model's outputs)."""
        live = features(inputs)
        rows = max((np.asarray(a).shape[0] if np.ndim(a) else 1) for a in inputs.values())
        with self._lock:
            for name, counts in self._counts.items():
                if name in live:
                    self._add(self.profile["features"][name], counts, live[name])
            if self._prediction_counts is not None and outputs:
                self._add(self._prediction, self._prediction_counts, predictions_of(outputs[0]))
            self.rows += rows

    def snapshot(self) -> dict:
        """Rows seen; per feature the distance, its threshold (the profile's, or the
        sampling noise of the rows seen when higher) and whether it drifts; the
        predictions' distance."""
        with self._lock:
            counts = {n: _copy(c) for n, c in self._counts.items()}
            prediction = _copy(self._prediction_counts)
            rows = self.rows
        distances, thresholds = {}, {}
        for name, seen in counts.items():
            ref = self.profile["features"][name]
            distances[name] = js_distance(ref, _shares(seen))
            total = int(sum(seen.values())) if isinstance(seen, dict) else int(seen.sum())
            thresholds[name] = max(
                self.base, noise_threshold(len(ref["shares"]), total, self.reference_rows)
            )
        drifted = sorted(n for n, d in distances.items() if rows and d > thresholds[n])
        return {
            "metric": "jensen_shannon_distance",
            "rows": rows,
            "features": distances if rows else {},
            "thresholds": thresholds,
            "drifted": drifted,
            "drift_share": len(drifted) / len(distances) if distances else 0.0,
            "prediction": js_distance(self._prediction, _shares(prediction))
            if prediction is not None and rows
            else None,
        }


def _copy(counts):
    return None if counts is None else dict(counts) if isinstance(counts, dict) else counts.copy()


def _shares(counts):
    if isinstance(counts, dict):
        total = max(1, sum(counts.values()))
        return {k: v / total for k, v in counts.items()}
    return (counts / max(1, int(counts.sum()))).tolist()


class DriftTracker:
    """Every served version's :class:`LiveDrift` (those loaded with a profile). Never
    raises into a request: a failure to observe is logged once per version and counted."""

    def __init__(self) -> None:
        self.versions: dict[tuple[str, str], LiveDrift] = {}
        self.failures: dict[tuple[str, str], int] = {}

    def observe(self, model, feeds: Mapping[str, np.ndarray], outputs: list) -> None:
        profile = getattr(model, "profile", None)
        if not profile:
            return
        key = (model.name, model.version)
        try:
            live = self.versions.get(key)
            if live is None:
                live = self.versions[key] = LiveDrift(profile)
            live.observe(feeds, outputs)
        except Exception:  # noqa: BLE001  (drift figures never fail a request)
            if key not in self.failures:
                import logging

                logging.getLogger(__name__).exception("drift of %s version %s", *key)
            self.failures[key] = self.failures.get(key, 0) + 1

    def snapshots(self) -> dict[tuple[str, str], dict]:
        return {key: live.snapshot() for key, live in list(self.versions.items())}
