"""Token, admin routes, following the alias, refusing a broken version, process hygiene.

These tests share the ``reloady`` endpoint and move its ``champion`` alias; they run in
file order and each leaves champion on a good version.
"""

from __future__ import annotations

import re
import time

import httpx
import numpy as np
import pytest

from tests.serving.conftest import corrupt_stored_model, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROW = {"inputs": [[0.25] * 64]}


def _served_version(endpoint) -> str:
    with endpoint.client() as http:
        response = http.post("/invocations", json=ROW)
    assert response.status_code == 200, response.text
    return response.headers["x-model-version"]


def test_token_guards_inference_and_admin(reloady):
    plain = httpx.Client(base_url=reloady.url, timeout=10)
    wrong = httpx.Client(
        base_url=reloady.url, timeout=10, headers={"authorization": "Bearer not-the-token"}
    )
    for client in (plain, wrong):
        for method, path in [
            ("POST", "/invocations"),
            ("POST", "/v2/models/reloady/infer"),
            ("GET", "/v2/models/reloady"),
            ("POST", "/admin/reload"),
            ("GET", "/admin/status"),
        ]:
            response = client.request(method, path, json=ROW)
            assert response.status_code == 401, (path, response.text)
            assert "bearer token" in response.json()["error"]
            assert response.headers["www-authenticate"] == "Bearer"
    # probes and scraping stay open
    assert plain.get("/v2/health/ready").status_code == 200
    assert plain.get("/v2/models/reloady/ready").status_code == 200
    assert plain.get("/metrics").status_code == 200
    assert _served_version(reloady) in ("1", "2")


def test_admin_routes_are_off_without_a_token(digits):
    with digits.client() as http:
        response = http.post("/admin/reload")
    assert response.status_code == 403
    assert "token" in response.json()["error"]


def test_no_heavy_modules_in_the_endpoint(reloady):
    with reloady.client() as http:
        status = http.get("/admin/status").json()
    assert status["heavy_modules_loaded"] == []
    assert status["serving"]["onnx_sha256"]


def test_admin_reload_swaps_to_the_new_champion(reloady, registry, registered):
    assert _served_version(reloady) == registered["reloady_1"]
    registry.set_alias("reloady", "champion", registered["reloady_2"])
    with reloady.client() as http:
        outcome = http.post("/admin/reload").json()
    # the fast watcher may have swapped first; either way version 2 now answers
    assert outcome["outcome"] in ("swapped", "unchanged"), outcome
    assert outcome["serving"] == registered["reloady_2"]
    assert _served_version(reloady) == registered["reloady_2"]


def test_watcher_follows_a_rollback(reloady, registry, registered):
    registry.set_alias("reloady", "champion", registered["reloady_1"])
    wait_for(lambda: _served_version(reloady) == registered["reloady_1"], timeout=15)
    with reloady.client() as http:
        metrics = http.get("/metrics").text
    assert f'onnxflow_model_version{{model="reloady"}} {float(registered["reloady_1"])}' in metrics
    assert 'onnxflow_reloads_total{outcome="swapped"}' in metrics


def test_broken_version_is_refused_and_old_keeps_serving(
    reloady, registry, model_files, registered
):
    from tests.serving.conftest import _example

    broken = registry.register(
        "reloady", model_files["mlp_v3"], _example(), aliases=("challenger",)
    )
    corrupt_stored_model(registry.stored_folder("reloady", broken))
    registry.set_alias("reloady", "champion", broken)
    try:
        with reloady.client() as http:
            response = http.post("/admin/reload")
            assert response.status_code == 409, response.text
            outcome = response.json()
            assert outcome["outcome"] == "refused"
            assert "sha256 mismatch" in outcome["detail"]
            assert outcome["serving"] == registered["reloady_1"]
            assert http.get("/v2/health/ready").status_code == 200
            assert _served_version(reloady) == registered["reloady_1"]
            # counted (once or twice: the watcher may have met it before the reload did) ...
            refusals = _refusals(http, broken)
            assert refusals >= 1
            # ... and while the alias stays there the watcher does not retry it
            time.sleep(1.6)
            assert http.get("/admin/status").json()["last_check"]["outcome"] == "refused"
            assert _refusals(http, broken) == refusals
            assert "sha256" in http.get("/admin/status").json()["refused"][broken]
    finally:
        registry.set_alias("reloady", "champion", registered["reloady_1"])


def _refusals(http, version: str) -> float:
    pattern = rf'onnxflow_model_refusals_total{{model="reloady",version="{version}"}} (\S+)'
    found = re.search(pattern, http.get("/metrics").text)
    return float(found.group(1)) if found else 0.0


def test_inflight_requests_survive_swaps(reloady, registry, registered):
    """Requests during a swap are answered by one version or the other, never fail."""
    import concurrent.futures

    x = np.random.default_rng(0).normal(size=(1, 64)).astype(np.float32).tolist()

    def hammer(n: int) -> set[str]:
        seen = set()
        with reloady.client() as http:
            for _ in range(n):
                response = http.post("/invocations", json={"inputs": x})
                assert response.status_code == 200, response.text
                seen.add(response.headers["x-model-version"])
        return seen

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(hammer, 150) for _ in range(4)]
        for version in (registered["reloady_2"], registered["reloady_1"]):
            registry.set_alias("reloady", "champion", version)
            with reloady.client() as http:
                http.post("/admin/reload")
        seen = set().union(*(f.result() for f in futures))
    assert seen <= {registered["reloady_1"], registered["reloady_2"]}
    assert _served_version(reloady) == registered["reloady_1"]
