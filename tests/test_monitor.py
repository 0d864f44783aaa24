"""The reference profile, drift against it, and the monitor on real captured traffic.

Drift on its own: unshifted samples of the training distribution are not flagged (the
false-alarm rate is measured over 50 samples), shifted features are, and only those.
Then a version registered with its profile in a real SQLite MLflow store, traffic written
by the endpoint's own capture writer and labels by its feedback store, and the monitor
logging its report and tags onto the version.
"""

from __future__ import annotations

import datetime as dt
import os
from types import SimpleNamespace

import numpy as np
import pytest

from onnxflow.monitor import MonitorError, RetrainPolicy, decide, monitor_model, parse_since
from onnxflow.profile import build_profile, drift, features, profile_and_sample
from tests.conftest import make_linear_onnx, run_onnxflow

# --- the profile and the drift figure ------------------------------------------------------


def _table(rng, rows: int, shift: float = 0.0, shifted: int = 0) -> np.ndarray:
    x = rng.normal(size=(rows, 8)).astype(np.float32)
    x[:, :shifted] += shift
    return x


def test_unshifted_samples_do_not_alarm_and_shifted_features_do():
    rng = np.random.default_rng(0)
    profile = build_profile({"x": _table(rng, 5000)}, None)
    assert len(profile["features"]) == 8 and profile["metric"] == "jensen_shannon_distance"

    alarms = sum(len(drift(profile, {"x": _table(rng, 500)})["drifted"]) for _ in range(50))
    false_alarm_rate = alarms / (50 * 8)
    assert false_alarm_rate == 0.0, false_alarm_rate  # 0 of 400 feature checks at 500 rows

    shifted = drift(profile, {"x": _table(rng, 500, shift=1.0, shifted=3)})
    assert shifted["drifted"] == ["x[0]", "x[1]", "x[2]"]
    assert shifted["drift_share"] == pytest.approx(3 / 8)
    assert min(shifted["features"][f"x[{i}]"] for i in range(3)) > 0.3


def test_categories_images_and_predictions_are_profiled():
    rng = np.random.default_rng(1)
    images = rng.uniform(size=(200, 3, 8, 8)).astype(np.float32)
    words = np.array(["a", "b", "c"], dtype=object)[rng.integers(0, 3, 200)]
    profile = build_profile({"image": images, "word": words}, rng.integers(0, 10, 200))
    assert set(profile["features"]) == {"image[c0]", "image[c1]", "image[c2]", "word"}
    assert profile["features"]["word"]["kind"] == "categorical"
    assert profile["features"]["image[c1]"]["mean"] == pytest.approx(0.5, abs=0.05)
    darker = drift(
        profile, {"image": images * 0.5, "word": np.array(["z"] * 200, dtype=object)}, [0] * 200
    )
    assert darker["drifted"] == ["image[c0]", "image[c1]", "image[c2]", "word"]
    assert darker["prediction"] > 0.5
    assert list(features({"v": np.zeros((4, 1))})) == ["v"]


def test_the_policy_decides_by_its_rules():
    policy = RetrainPolicy(max_drift_share=0.3, min_live_accuracy=0.8, min_labels=50)
    assert decide(policy, 1000, 0.5, None, 0)[0]
    assert not decide(policy, 1000, 0.1, 0.5, 49)[0]  # too few labels to judge
    assert decide(policy, 1000, 0.1, 0.5, 50) == (
        True,
        "live accuracy 0.500 < min_live_accuracy 0.8 on 50 labels",
    )
    assert not decide(policy, 10, 0.9, 0.1, 100)[0]  # too few rows
    now = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    assert parse_since("6h", now) == dt.datetime(2026, 1, 1, 18, tzinfo=dt.UTC)
    with pytest.raises(MonitorError, match="expected a duration"):
        parse_since("yesterday")


# --- the monitor on captured traffic --------------------------------------------------------


def _capture(folder, model, x: np.ndarray, labels=None):
    """Write ``x`` as the endpoint would (its capture writer), one request per row; labels
    through its feedback store."""
    import onnxruntime as ort

    from onnxflow.serving.capture import Capture
    from onnxflow.serving.feedback import FeedbackStore, Label
    from onnxflow.serving.settings import ServingSettings

    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    settings = ServingSettings(model="m@champion", capture=str(folder))
    capture = Capture(settings)
    capture.start()
    ids = []
    for i, row in enumerate(x):
        feeds = {"features": row[None]}
        outputs = session.run(None, feeds)
        rid = f"{model.tag}-{i}"
        capture.offer(model, rid, feeds, outputs, 0.001)
        ids.append((rid, int(outputs[0].argmax())))
    capture.stopping()
    capture.stop()
    if labels is not None:
        store = FeedbackStore(capture)
        given = [(rid, labels(i, p)) for i, (rid, p) in enumerate(ids)]  # None: no label
        store.submit(model.name, [Label(rid, 0, str(v)) for rid, v in given if v is not None])


def test_the_monitor_flags_shifted_traffic_and_writes_onto_the_version(mlflow_store, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from onnxflow.registration import register_onnx

    rng = np.random.default_rng(2)
    path = make_linear_onnx(tmp_path / "m" / "model.onnx")
    train = rng.normal(size=(3000, 64)).astype(np.float32)
    profile, reference = profile_and_sample(path, train, train[:500])
    assert set(reference) == {f"features[{j}]" for j in range(64)} | {"prediction"}
    registered = register_onnx(
        path,
        model_name="mon",
        input_example=train[:1],
        aliases=("champion",),
        profile=profile,
        reference_sample=reference,
    )
    model = SimpleNamespace(
        name="mon", version=registered.version, output_names=["probabilities"], path=path
    )
    policy = RetrainPolicy(max_drift_share=0.3, min_live_accuracy=0.8, min_labels=50)
    since = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)

    calm = tmp_path / "calm"
    _capture(
        calm,
        SimpleNamespace(**vars(model), tag="calm"),
        rng.normal(size=(400, 64)).astype(np.float32),
        labels=lambda i, p: p,
    )
    figures = monitor_model("mon", str(calm), since, policy)
    assert (figures.rows, figures.labelled, figures.live_accuracy) == (400, 400, 1.0)
    assert figures.drift_share == 0.0 and not figures.retrain, figures.reason
    print("evidently drift share, calm:", figures.evidently_drift_share)
    assert figures.evidently_drift_share is not None and figures.evidently_drift_share < 0.2

    shifted = tmp_path / "shifted"
    x = rng.normal(size=(400, 64)).astype(np.float32)
    x[:, :32] += 1.5
    _capture(
        shifted, SimpleNamespace(**vars(model), tag="shift"), x, labels=lambda i, p: (p + 1) % 10
    )
    figures = monitor_model("mon", str(shifted), since, policy)
    assert figures.drifted == [f"features[{j}]" for j in sorted(range(32), key=str)] or (
        set(figures.drifted) == {f"features[{j}]" for j in range(32)}
    )
    assert figures.drift_share == 0.5 and figures.live_accuracy == 0.0
    assert figures.retrain and "drift share 0.50" in figures.reason
    # Evidently's own test (JS past 0.1, its own bins) finds the same 32 features shifted,
    # of 65 columns (64 features and the prediction)
    print("evidently drift share, shifted:", figures.evidently_drift_share)
    assert 32 / 65 <= figures.evidently_drift_share <= 36 / 65

    version = MlflowClient().get_model_version("mon", registered.version)
    assert version.tags["monitor_drift_share"] == "0.5000"
    assert version.tags["monitor_live_accuracy"] == "0.0000"
    assert version.tags["monitor_rows"] == "400" and version.tags["monitor_retrain"] == "yes"
    assert version.tags["monitor_evidently_drift_share"] == f"{figures.evidently_drift_share:.4f}"
    runs = f"runs:/{registered.run_id}/monitor"
    report = mlflow.artifacts.load_dict(f"{runs}/report.json")
    assert report["drift_share"] == 0.5
    drifted = report["evidently"]["data_drift"]["metrics"][0]
    assert drifted["metric_name"].startswith("DriftedColumnsCount")
    assert drifted["value"]["share"] == figures.evidently_drift_share
    names = {m["metric_name"] for m in report["evidently"]["classification"]["metrics"]}
    assert any(name.startswith("Accuracy") for name in names), names
    page = mlflow.artifacts.load_text(f"{runs}/report.html")  # Evidently's own page
    assert "Share of Drifted Columns" in page and "features[0]" in page
    assert "Accuracy" in mlflow.artifacts.load_text(f"{runs}/classification.html")
    assert "Retrain: <b>yes</b>" in mlflow.artifacts.load_text(f"{runs}/summary.html")


def test_the_monitor_command_refuses_a_bad_window_and_a_model_without_profile(
    mlflow_store, tmp_path
):
    import subprocess
    import sys

    command = [sys.executable, "-m", "onnxflow.cli", "monitor", "nosuch", "--capture"]
    done = subprocess.run(
        [*command, str(tmp_path), "--since", "yesterday"], capture_output=True, text=True
    )
    assert done.returncode == 1 and "expected a duration (30m, 6h, 2d)" in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [
        done.stderr.strip().splitlines()[-1]
    ]

    from onnxflow.registration import register_onnx

    path = make_linear_onnx(tmp_path / "m" / "model.onnx")
    x = np.zeros((1, 64), np.float32)
    register_onnx(path, model_name="bare", input_example=x, aliases=("champion",))
    with pytest.raises(MonitorError, match="has no reference profile"):
        monitor_model("bare", str(tmp_path), parse_since("1h"), RetrainPolicy())

    # a profiled version that has answered nothing yet: no data, said in one line (exit 0),
    # and on the version, so a scheduled monitor before any traffic is not a failure
    from mlflow import MlflowClient

    profile, reference = profile_and_sample(path, np.zeros((50, 64), np.float32), x)
    register_onnx(
        path,
        model_name="prof",
        input_example=x,
        aliases=("champion",),
        profile=profile,
        reference_sample=reference,
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    figures = monitor_model("prof", str(empty), parse_since("1h"), RetrainPolicy())
    assert (figures.status, figures.rows, figures.retrain) == ("no_data", 0, False)
    assert figures.reason == f"nothing captured for prof version 1 under {empty} yet"
    tags = MlflowClient().get_model_version("prof", "1").tags
    assert tags["monitor_status"] == "no_data" and tags["monitor_rows"] == "0"
    assert tags["monitor_drift_share"] == "n/a" and tags["monitor_live_accuracy"] == "n/a"

    done = run_onnxflow("monitor", "prof", "--capture", str(empty), cwd=tmp_path, env=os.environ)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].startswith("prof version 1, since "), done.stdout
    assert "no data (nothing captured for prof version 1" in done.stdout

    # no capture location at all is an error that names it; nothing is written
    missing = tmp_path / "nosuch"
    with pytest.raises(MonitorError, match=f"capture location {missing} does not exist"):
        monitor_model("prof", str(missing), parse_since("1h"), RetrainPolicy())


def test_retrain_data_is_the_original_table_plus_the_labelled_captured_rows(tmp_path):
    import pyarrow.parquet as pq

    from onnxflow.config import DataConfig
    from onnxflow.evidence import build_retrain_data

    rng = np.random.default_rng(4)
    x = rng.normal(size=(60, 4))
    names = np.array(["cat", "dog"], dtype=object)[(x[:, 0] > 0).astype(int)]
    table = tmp_path / "pets.csv"
    lines = ["a,b,c,d,kind"] + [",".join([*map(str, r), k]) for r, k in zip(x, names)]
    table.write_text("\n".join(lines) + "\n")
    path = make_linear_onnx(tmp_path / "m" / "model.onnx", n_in=4, n_out=2)
    model = SimpleNamespace(
        name="pets", version="1", output_names=["probabilities"], path=path, tag="t"
    )
    live = rng.normal(size=(30, 4)).astype(np.float32)
    # rows 0..19 labelled 1 ("dog"), the rest never labelled
    _capture(tmp_path / "cap", model, live, labels=lambda i, p: 1 if i < 20 else None)
    data = DataConfig(path=table, target="kind")
    since = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    built = build_retrain_data(data, str(tmp_path / "cap"), "pets", "1", since, tmp_path / "o")

    # held out for the common evaluation set: the original test split (20% of 60, the
    # pipeline's own seeded split) and 30% of the 20 labelled captured rows
    assert (built.rows_original, built.rows_captured) == (48, 14)
    assert (built.eval_rows_original, built.eval_rows_captured) == (12, 6)
    assert built.tags()["retrain_rows_captured"] == "14" and built.task == "classification"
    written = pq.read_table(built.path).to_pydict()
    assert list(written) == ["a", "b", "c", "d", "kind"] and len(written["kind"]) == 62
    assert written["kind"][48:] == ["dog"] * 14  # class index 1 -> the table's own value
    held = pq.read_table(built.eval_path).to_pydict()
    assert held["_source"] == ["original"] * 12 + ["captured"] * 6
    assert held["kind"][12:] == ["dog"] * 6
    captured = np.concatenate([written["a"][48:], held["a"][12:]])
    np.testing.assert_allclose(np.sort(captured), np.sort(live[:20, 0]), rtol=1e-6)
    original = np.concatenate([written["a"][:48], held["a"][:12]])
    np.testing.assert_allclose(np.sort(original), np.sort(x[:, 0]), rtol=1e-6)

    with pytest.raises(MonitorError, match="3 features: not the same table"):
        narrow = tmp_path / "narrow.csv"
        narrow.write_text("a,b,c,kind\n" + "\n".join(f"1,2,3,{k}" for k in names) + "\n")
        build_retrain_data(
            DataConfig(path=narrow, target="kind"),
            str(tmp_path / "cap"),
            "pets",
            "1",
            since,
            tmp_path / "o2",
        )


def test_reference_rows_have_one_value_per_row_and_feature():
    """The reference sample Evidently compares with is row-wise: a table's columns, a scalar
    input, an image channel as the row's mean of it (NCHW, NHWC, one-channel HW)."""
    from onnxflow.profile import row_features

    rng = np.random.default_rng(5)
    table, scalar = rng.normal(size=(6, 3)), rng.integers(0, 4, size=6)
    nchw, nhwc, gray = (rng.normal(size=shape) for shape in ((6, 3, 8, 8), (6, 8, 8, 3), (6, 9, 9)))
    rows = row_features({"t": table, "s": scalar, "a": nchw, "b": nhwc, "g": gray})
    assert set(rows) == {"t[0]", "t[1]", "t[2]", "s"} | {
        f"{name}[c{c}]"
        for name, channels in (("a", 3), ("b", 3), ("g", 1))
        for c in range(channels)
    }
    assert all(values.shape == (6,) for values in rows.values())
    np.testing.assert_allclose(rows["t[1]"], table[:, 1])
    np.testing.assert_allclose(rows["a[c2]"], nchw[:, 2].mean(axis=(1, 2)))
    np.testing.assert_allclose(rows["b[c1]"], nhwc[..., 1].mean(axis=(1, 2)))
    np.testing.assert_allclose(rows["g[c0]"], gray.mean(axis=(1, 2)))
