"""`make demo-loop`: the production loop on one machine, printed as a timeline.

A scikit-learn model trained by the pipeline on a 4-feature table serves as champion
(a real endpoint with --capture and --shadow challenger, on a temporary SQLite MLflow
store). Traffic shifts halfway: a sensor offset moves features f0 and f1 by +2.5 and the
label follows the recalibrated value. The timeline: live drift gauges before and after
the shift, labels fed back, `onnxflow monitor --retrain` (drift -> retrain on the original
plus the labelled captured rows -> challenger, both versions measured on a common
evaluation set), the challenger in shadow, the next `onnxflow monitor --retrain` (the
promotion gate: the common evaluation, auto mode), the endpoint following the new
champion, and accuracy on fresh shifted traffic of the old and the new version.

It runs without the stack (one endpoint, a SQLite store: about two and a half minutes);
on the stack the same loop is tests/integration/test_stack_retrain_loop.py.

    python bench/demo_loop.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "demo-loop-token-0123456789"
T0 = time.perf_counter()


def say(text: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f} s] {text}", flush=True)


def traffic(rng, rows: int, shifted: bool) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(rows, 4))
    offset = 2.5 if shifted else 0.0
    x[:, :2] += offset
    return x, ((x[:, 0] - offset) - x[:, 2] > 0).astype(int)


def onnxflow(*args: str, env: dict) -> str:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "onnxflow"), *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"onnxflow {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout.strip()


def send(http, x: np.ndarray, batch: int = 10) -> list[tuple[str, int]]:
    """Answer x in requests of ``batch`` rows; (request id, row) of each row."""
    rows = []
    for start in range(0, len(x), batch):
        part = x[start : start + batch].astype(np.float32)
        body = {
            "inputs": [
                {
                    "name": "features",
                    "datatype": "FP32",
                    "shape": list(part.shape),
                    "data": part.ravel().tolist(),
                }
            ]
        }
        response = http.post("/v2/models/tab/infer", json=body)
        response.raise_for_status()
        rid = response.json()["id"]  # the capture's new id
        rows += [(rid, i) for i in range(len(part))]
    return rows


def drift_line(http) -> str:
    status = http.get("/admin/status").json()["drift"].get("tab", {})
    if not status:
        return "no drift figures"
    version, snap = max(status.items())
    worst = sorted(snap["features"].items(), key=lambda kv: -kv[1])[:2]
    return (
        f"v{version}: {snap['rows']} rows seen, drifted {snap['drifted'] or 'none'}; "
        f"largest JS {', '.join(f'{k} {v:.2f}' for k, v in worst)}; prediction JS "
        f"{snap['prediction']:.2f}"
    )


def wait_for_capture(folder: Path, rows: int, timeout_s: float = 60) -> None:
    """Until the closed capture segments hold ``rows`` rows."""
    import pyarrow.dataset as ds

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (folder / "model=tab").is_dir():
            found = ds.dataset(folder / "model=tab", format="parquet", partitioning="hive")
            if found.count_rows() >= rows:
                return
        time.sleep(0.2)
    sys.exit(f"the capture under {folder} did not reach {rows} rows in {timeout_s} s")


def accuracy(name: str, version: str, x: np.ndarray, y: np.ndarray) -> float:
    import mlflow
    import onnxruntime as ort

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}"))
    session = ort.InferenceSession(str(next(local.rglob("*.onnx"))))
    out = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]
    return float((np.asarray(out).argmax(axis=1) == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=Path, help="work in DIR and keep it")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="onnxflow-demo-loop-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "ONNXFLOW_TRACKING_URI": uri,
        "ONNXFLOW_ARTIFACTS_DIR": str(work / "art"),
    }
    os.environ.update(MLFLOW_TRACKING_URI=uri)
    rng = np.random.default_rng(0)

    x, y = traffic(rng, 600, shifted=False)
    header = "f0,f1,f2,f3,label"
    np.savetxt(
        work / "table.csv",
        np.column_stack([x, y]),
        delimiter=",",
        header=header,
        comments="",
        fmt=["%.6f"] * 4 + ["%d"],
    )
    say("train: onnxflow run --framework sklearn on a 600-row table (f0..f3 -> label)")
    onnxflow(
        "run",
        "--framework",
        "sklearn",
        "--data",
        "table.csv",
        "--target",
        "label",
        "--model-name",
        "tab",
        env=env,
    )
    say("  version 1 registered and promoted to champion")

    import httpx

    from onnxflow.processes import free_port
    from onnxflow.serving.launcher import start_background, stop_background, wait_ready
    from onnxflow.serving.settings import ServingSettings

    state = work / "endpoint"
    settings = ServingSettings(
        model="tab@champion",
        port=free_port(),
        cache_dir=state / "cache",
        token=TOKEN,
        poll_interval_s=1,
        capture=str(work / "captured"),
        capture_segment_s=1,  # segments readable by the monitor within a second
        shadow="challenger",
        tracking_uri=uri,
    )
    info = start_background(settings, state)
    try:
        wait_ready(info, timeout_s=240)
        say(f"serve: tab@champion at {info.url}, capture on, challenger in shadow when it exists")
        headers = {"authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=info.url, headers=headers, timeout=30) as http:
            x, y = traffic(rng, 300, shifted=False)
            send(http, x)
            say(f"traffic: 300 rows as trained   -> {drift_line(http)}")
            shift_start = dt.datetime.now(dt.UTC)
            x, y = traffic(rng, 300, shifted=True)
            ids = send(http, x)
            say(f"traffic: 300 rows, f0 f1 +2.5  -> {drift_line(http)}")
            labels = [{"request_id": r, "row": i, "label": int(v)} for (r, i), v in zip(ids, y)]
            http.post("/v2/models/tab/feedback", json={"labels": labels}).raise_for_status()
            say("feedback: 300 labels for the shifted rows (POST /v2/models/tab/feedback)")

            wait_for_capture(work / "captured", 600)
            since = shift_start.isoformat(timespec="microseconds")
            monitor = ("monitor", "tab", "--capture", str(work / "captured"), "--since", since)
            say(f"monitor: onnxflow monitor tab --since {since} --retrain")
            out = onnxflow(*monitor, "--retrain", env=env)
            for line in out.splitlines()[-2:]:
                say(f"  {line}")

            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # the endpoint's poll finds the challenger
                shadow = (http.get("/admin/status").json()["shadow"] or {}).get("models", {})
                if shadow.get("tab", {}).get("shadow") == "2":
                    break
                time.sleep(0.5)
            x, y = traffic(rng, 300, shifted=True)
            send(http, x)
            written = http.post("/admin/shadow/flush").json()["written"]
            shadow = written[0]["tags"] if written else {}
            say(
                f"shadow: v2 mirrored {shadow.get('shadow_requests')} requests (300 more shifted "
                f"rows), agreement with v1 {shadow.get('shadow_agreement')}, "
                f"{shadow.get('shadow_errors')} errors"
            )
            say("monitor: onnxflow monitor tab --retrain --min-shadow-requests 20 (the gate)")
            out = onnxflow(*monitor, "--retrain", "--min-shadow-requests", "20", env=env)
            say(f"  {out.splitlines()[-1]}")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if http.get("/v2/models/tab").json().get("versions") == ["2"]:
                    break
                time.sleep(0.5)
            served = http.get("/v2/models/tab").json()["versions"]
            say(f"serve: the endpoint follows champion: it serves version {served[0]}")
    finally:
        stop_background(state)

    x, y = traffic(rng, 2000, shifted=True)
    before, after = accuracy("tab", "1", x, y), accuracy("tab", "2", x, y)
    say(f"accuracy on 2,000 fresh shifted rows: version 1 {before:.3f}, version 2 {after:.3f}")
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
