"""Load at 64 connections, and hot swaps of ``champion`` while that load runs.

What must hold: no request fails; memory does not grow across the run; every answer
names a version that was champion during its request (allowing the endpoint's documented
follow delay: one poll interval plus the load of the new version); once an answer from
the new version has been seen, no later request gets the old one (the swap is atomic).
"""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from tests.reliability.conftest import (
    PROFILE,
    TOKEN,
    RssSampler,
    endpoint_pid,
    served_version,
    wait_for,
)
from tests.reliability.load import ROW, LoadProcess

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.timeout(600)]

#: How long after an alias move the endpoint may still answer with the old version:
#: the watcher's poll interval (0.2 s) plus downloading and warming the new one.
FOLLOW_BOUND_S = 3.0


def test_load_64_connections_zero_failures_and_stable_memory(swappy, tmp_path, report):
    pid = endpoint_pid(swappy)
    load = LoadProcess(
        swappy.url, tmp_path / "load.json", connections=64, duration=PROFILE.load_s, token=TOKEN
    )
    with RssSampler(pid) as rss:
        result = load.result()
    assert result.sent > 0
    assert not result.failed, f"{len(result.failed)} failed, e.g. {result.failed[:3]}"

    # Memory: the second half of the run holds no more than the first half did, plus a
    # little slack for allocator noise (a leak of one buffer per request shows as MBs).
    samples = [v for _, v in rss.samples]
    half = len(samples) // 2
    first, second = max(samples[:half]), max(samples[half:])
    growth = second - first
    report.count("requests_sent", result.sent)
    report.count("requests_failed", len(result.failed))
    report.add("load_p50_ms", result.latency_ms(0.50))
    report.add("load_p99_ms", result.latency_ms(0.99))
    report.add("load_rps", result.sent / PROFILE.load_s)
    report.add("load_rss_growth_mb", growth)
    report.peak("peak_rss_mb", rss.peak)
    assert growth < max(8.0, 0.05 * first), f"RSS grew {first:.1f} -> {second:.1f} MB"


def test_wrk_throughput_zero_errors(swappy, tmp_path, report):
    assert shutil.which("wrk"), "wrk is missing: `make system-packages` installs it"
    import json

    script = tmp_path / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{json.dumps(ROW)}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {TOKEN}"\n'
        "done = function(summary, latency, requests)\n"
        '  io.write(string.format("RESULT %d %d %d %d %d %f\\n", summary.requests,'
        " summary.errors.connect + summary.errors.read + summary.errors.write +"
        " summary.errors.timeout, summary.errors.status, latency:percentile(50),"
        " latency:percentile(99), summary.duration / 1e6))\n"
        "end\n"
    )
    with RssSampler(endpoint_pid(swappy)) as rss:
        out = subprocess.run(
            [
                "wrk",
                "-t2",
                "-c64",
                f"-d{PROFILE.wrk_s}s",
                "-s",
                str(script),
                f"{swappy.url}/invocations",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    line = next(row for row in out.splitlines() if row.startswith("RESULT"))
    requests, socket_errors, status_errors, p50_us, p99_us, seconds = line.split()[1:]
    report.count("requests_sent", int(requests))
    report.count("requests_failed", int(socket_errors) + int(status_errors))
    report.add("wrk_rps", int(requests) / float(seconds))
    report.add("wrk_p99_ms", int(p99_us) / 1000)
    report.peak("peak_rss_mb", rss.peak)
    assert int(socket_errors) == 0 and int(status_errors) == 0, out


def test_hot_swaps_under_load_drop_nothing_and_never_mix_versions(
    swappy, registry, versions, tmp_path, report
):
    v1, v2 = versions["v1"], versions["v2"]
    registry.set_alias("swappy", "champion", v1)
    wait_for(lambda: served_version(swappy) == v1, timeout=15)

    # Enough load to cover every swap: each takes well under FOLLOW_BOUND_S.
    duration = PROFILE.swaps * 1.2 + 2
    load = LoadProcess(
        swappy.url, tmp_path / "swap-load.json", connections=64, duration=duration, token=TOKEN
    )
    # The champion timeline as the registry saw it: (version, from, to). An alias move
    # happens at some moment inside the set_alias call, so each interval is widened to it.
    timeline = [[v1, 0.0, None]]
    moves = []
    with RssSampler(endpoint_pid(swappy)) as rss:
        time.sleep(1.0)
        target = v2
        for _ in range(PROFILE.swaps):
            before = time.time()
            registry.set_alias("swappy", "champion", target)
            after = time.time()
            timeline[-1][2] = after
            timeline.append([target, before, None])
            moves.append((target, before, after))
            wait_for(
                lambda target=target: served_version(swappy) == target,
                timeout=FOLLOW_BOUND_S,
                interval=0.01,
            )
            time.sleep(0.3)
            target = v1 if target == v2 else v2
        result = load.result()
    timeline[-1][2] = float("inf")

    assert not result.failed, f"{len(result.failed)} failed, e.g. {result.failed[:3]}"
    assert result.versions() == {v1, v2}

    # Every answer names a version that was champion at some moment of its request,
    # widened at the start by the follow bound (the endpoint learns of a move by polling).
    def was_champion(version, sent, received) -> bool:
        return any(
            v == version and start <= received and sent - FOLLOW_BOUND_S <= end
            for v, start, end in timeline
        )

    wrong = [s for s in result.samples if not was_champion(s[3], s[0], s[1])]
    assert not wrong, f"{len(wrong)} answers from a version that was not champion: {wrong[:3]}"

    # Atomic: once an answer from the new version has arrived, a request sent after it
    # and answered before the alias moved again was served by the new version (the
    # server handled it inside that span, when only the new version could be served).
    # And the swap latency: from the end of the alias move to that first answer.
    latencies = []
    for i, (target, before, after) in enumerate(moves):
        until = moves[i + 1][1] if i + 1 < len(moves) else float("inf")
        first_new = min(
            (s[1] for s in result.samples if s[3] == target and s[0] >= before and s[1] < until),
            default=None,
        )
        assert first_new is not None, f"move {i} to version {target} never answered"
        stale = [s for s in result.samples if s[0] > first_new and s[1] < until and s[3] != target]
        assert not stale, f"move {i}: old version answered after the new one: {stale[:3]}"
        latencies.append(max(0.0, first_new - after))

    report.count("requests_sent", result.sent)
    report.count("requests_failed", len(result.failed))
    report.add("swap_latencies_s", latencies)
    report.peak("peak_rss_mb", rss.peak)
    assert max(latencies) < FOLLOW_BOUND_S
