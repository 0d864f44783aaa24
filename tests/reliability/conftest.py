"""The reliability suite: real endpoint and MLflow server processes, loaded and broken.

Two forms, same tests. The short form (default, part of ``make test``) asserts the
zero-failure properties in seconds per test; the long form (``ONNXFLOW_SOAK=1``, what
``make soak`` runs) runs longer loads, more swaps and at least 1,000 fuzz cases, and
writes ``test-results/soak-report.{json,md}``. Either way the session ends with one
table of the figures the tests recorded.

Registries, models and servers come from the serving tests' helpers
(:mod:`tests.serving.conftest`); this file adds only what the suite itself needs: the
profile, the report, and endpoints with their own settings.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from onnxflow.processes import free_port
from onnxflow.serving.launcher import read_info, start_background, stop_background, wait_ready
from onnxflow.serving.settings import ServingSettings
from tests.serving import models
from tests.serving.conftest import (  # noqa: F401  (fixtures, re-exported for this folder)
    TOKEN,
    Endpoint,
    Registry,
    _example,
    model_files,
    registry,
    tracking_server,
    wait_for,
)

SOAK = os.environ.get("ONNXFLOW_SOAK", "") not in ("", "0", "false")
RESULTS = Path(__file__).resolve().parents[2] / "test-results"


@dataclass(frozen=True)
class Profile:
    name: str
    load_s: float  # the plain load run
    swaps: int  # alias moves under load
    fault_load_s: float  # load kept up while the MLflow server is down
    fuzz_per_route: int  # schemathesis examples per operation
    slow_clients: int
    wrk_s: int  # seconds of the wrk run


SHORT = Profile(
    "short", load_s=4, swaps=10, fault_load_s=3, fuzz_per_route=12, slow_clients=32, wrk_s=3
)
LONG = Profile(
    "long", load_s=60, swaps=30, fault_load_s=10, fuzz_per_route=80, slow_clients=256, wrk_s=20
)
PROFILE = LONG if SOAK else SHORT


@dataclass
class Report:
    """Figures recorded by the tests; printed as one table at the end of the session."""

    figures: dict = field(default_factory=dict)
    faults: dict = field(default_factory=dict)  # name -> survived (bool)

    def add(self, key: str, value) -> None:
        self.figures[key] = value

    def count(self, key: str, n: int = 1) -> None:
        self.figures[key] = self.figures.get(key, 0) + n

    def peak(self, key: str, value: float) -> None:
        self.figures[key] = max(self.figures.get(key, 0), value)

    def fault(self, name: str, survived: bool) -> None:
        self.faults[name] = survived

    def rows(self) -> list[tuple[str, str]]:
        f = self.figures

        def ms(key):
            return f"{f[key]:.2f} ms" if key in f else "-"

        swaps = f.get("swap_latencies_s", [])
        survived = sum(self.faults.values())
        rows = [
            ("profile", PROFILE.name),
            ("requests sent", f"{f.get('requests_sent', 0):,}"),
            ("requests failed", f"{f.get('requests_failed', 0):,}"),
            ("load p50 / p99 (64 conn)", f"{ms('load_p50_ms')} / {ms('load_p99_ms')}"),
            ("load throughput", f"{f['load_rps']:,.0f} req/s" if "load_rps" in f else "-"),
            (
                "wrk throughput / p99",
                f"{f['wrk_rps']:,.0f} req/s / {f['wrk_p99_ms']:.2f} ms" if "wrk_rps" in f else "-",
            ),
            ("swaps done (under load)", str(len(swaps))),
            (
                "swap latency median / max",
                f"{sorted(swaps)[len(swaps) // 2] * 1000:.0f} / {max(swaps) * 1000:.0f} ms"
                if swaps
                else "-",
            ),
            (
                "faults injected / survived",
                f"{len(self.faults)} / {survived}"
                + (
                    f" ({', '.join(k for k, v in self.faults.items() if not v)} failed)"
                    if survived < len(self.faults)
                    else ""
                ),
            ),
            (
                "fuzz cases run",
                f"{f.get('fuzz_cases', 0):,} schemathesis + {f.get('hostile_cases', 0):,} hostile",
            ),
            ("5xx seen", str(f.get("5xx", 0))),
            (
                "endpoint peak memory (RSS)",
                f"{f['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in f else "-",
            ),
            (
                "memory growth under load",
                f"{f['load_rss_growth_mb']:+.1f} MB" if "load_rss_growth_mb" in f else "-",
            ),
        ]
        return rows

    def table(self) -> str:
        rows = self.rows()
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)

    def write(self) -> Path:
        RESULTS.mkdir(exist_ok=True)
        stem = "soak-report" if SOAK else "reliability-short"
        data = {
            "profile": PROFILE.name,
            "figures": self.figures,
            "faults": self.faults,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=2))
        md = ["| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in self.rows())]
        (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
        return RESULTS / f"{stem}.md"


REPORT = Report()


@pytest.fixture(scope="session")
def report() -> Report:
    return REPORT


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not (REPORT.figures or REPORT.faults):
        return
    path = REPORT.write()
    terminalreporter.section(f"reliability ({PROFILE.name} form)")
    terminalreporter.write_line(REPORT.table())
    terminalreporter.write_line(f"  (written to {path.relative_to(RESULTS.parent)})")


# --- process facts ----------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class RssSampler:
    """Samples a process's RSS in a thread, every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        import threading

        self.pid, self.interval = pid, interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), rss_mb(self.pid)))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> float:
        return max(v for _, v in self.samples)


READINESS = ("/v2/health/ready", "/ping", "/health", "/v2/models/{name}/ready")


def server_errors(endpoint: Endpoint) -> int:
    """5xx answers the endpoint itself counted (its /metrics), every route included."""
    import re

    import httpx

    text = httpx.get(f"{endpoint.url}/metrics", timeout=10).text
    total = 0
    for labels, value in re.findall(r"^onnxflow_requests_total\{([^}]*)\} (\S+)$", text, re.M):
        if 'status="5' not in labels:
            continue
        if 'status="503"' in labels and any(f'route="{r}"' in labels for r in READINESS):
            continue  # "not ready yet" while starting: the readiness protocol, not an error
        total += int(float(value))
    return total


def kill_process_group(pid: int) -> None:
    try:
        os.killpg(os.getpgid(pid), signal.SIGKILL)
    except ProcessLookupError:
        pass


def tracking_server_pid(url: str) -> int:
    """Pid of the ``mlflow server`` this session started on ``url``'s port."""
    port = url.rsplit(":", 1)[1]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"mlflow" in argv
            and b"server" in argv
            and port.encode() in argv
            and os.getpgid(int(proc.name)) == int(proc.name)
        ):
            return int(proc.name)
    raise AssertionError(f"no mlflow server on port {port}")


def mlflow_healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


# --- models and endpoints ---------------------------------------------------------------


@pytest.fixture(scope="session")
def versions(registry, model_files) -> dict[str, str]:
    """``swappy`` versions 1 and 2 (champion: 1), both good."""
    return {
        "v1": registry.register("swappy", model_files["mlp"], _example()),
        "v2": registry.register(
            "swappy", model_files["mlp_v2"], _example(), aliases=("challenger",)
        ),
    }


def start_endpoint(
    registry: Registry, state_dir: Path, tracking_uri: str | None = None, **options
) -> Endpoint:
    """A ``python -m onnxflow.serving`` process (waits until ready); stop_background stops it.
    ``options`` are ServingSettings fields; the token is the tests' TOKEN unless given."""
    options.setdefault("token", TOKEN)
    with pytest.MonkeyPatch.context() as patch:  # the endpoint inherits the tracking URI
        patch.setenv("MLFLOW_TRACKING_URI", tracking_uri or registry.uri)
        settings = ServingSettings(
            port=free_port(), cache_dir=state_dir / "cache", log_level="info", **options
        )
        info = start_background(settings, state_dir)
    try:
        wait_ready(info, timeout_s=90)
    except BaseException:
        stop_background(state_dir)
        raise
    token = settings.token.get_secret_value() if settings.token else None
    return Endpoint(info.url, settings.model_name, state_dir, token)


def endpoint_pid(endpoint: Endpoint) -> int:
    return read_info(endpoint.state_dir).pid


@pytest.fixture(scope="session")
def swappy(registry, versions, tmp_path_factory, report):
    """``swappy@champion`` with a token and a 0.2 s watcher, on the SQLite registry."""
    endpoint = start_endpoint(
        registry,
        tmp_path_factory.mktemp("swappy"),
        model="swappy@champion",
        poll_interval_s=0.2,
    )
    yield endpoint
    finish(endpoint, report)


def finish(endpoint: Endpoint, report: Report) -> None:
    """Count the endpoint's 5xx into the report, then stop it."""
    try:
        report.count("5xx", server_errors(endpoint))
    finally:
        stop_background(endpoint.state_dir)


def served_version(endpoint: Endpoint) -> str | None:
    import httpx

    try:
        response = httpx.get(f"{endpoint.url}/v2/models/{endpoint.name}/ready", timeout=5)
    except httpx.TransportError:
        return None
    return response.headers.get("x-model-version")


__all__ = ["PROFILE", "SOAK", "models"]
