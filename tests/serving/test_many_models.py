"""Many models on one endpoint: routing by name, a broken one refused without taking the
others down, ``--all-models ALIAS`` picking up new models, each model following its alias.

One endpoint process serves every model with the alias ``team``, plus ``digits@champion``
named first. Discovery is also checked against a real ``mlflow server`` (the REST path).
"""

from __future__ import annotations

import re

import httpx
import numpy as np
import pytest

from onnxflow.processes import free_port
from onnxflow.serving.launcher import start_background, stop_background, wait_ready
from onnxflow.serving.registry_reader import registry_for
from onnxflow.serving.settings import ServingSettings
from tests.serving import models
from tests.serving.conftest import TOKEN, Endpoint, _example, corrupt_stored_model, wait_for
from tests.serving.models import v2_request

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROW = {"inputs": [[0.25] * 64]}


@pytest.fixture(scope="module")
def team(registry, registered, model_files, tmp_path_factory, monkeypatch_module):
    versions = {
        "team_a": registry.register("team_a", model_files["mlp"], _example(), aliases=("team",)),
        "team_multi": registry.register(
            "team_multi", model_files["multi"], models.multi_example(), aliases=("team",)
        ),
        "team_broken": registry.register(
            "team_broken", model_files["mlp"], _example(), aliases=("team",)
        ),
    }
    corrupt_stored_model(registry.stored_folder("team_broken", versions["team_broken"]))
    root = tmp_path_factory.mktemp("team")
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", registry.uri)
    settings = ServingSettings(
        model="digits@champion",
        all_models="team",
        port=free_port(),
        cache_dir=root / "cache",
        token=TOKEN,
        poll_interval_s=0.5,
    )
    info = start_background(settings, root)
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI")
    try:
        wait_ready(info, timeout_s=240)
        yield Endpoint(info.url, "digits", root, TOKEN), versions
    finally:
        stop_background(root)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_settings_refuse_a_model_given_twice_and_nothing_to_serve():
    with pytest.raises(ValueError, match="'a' given more than once"):
        ServingSettings(model="a@champion,a/3")
    with pytest.raises(ValueError, match="nothing to serve"):
        ServingSettings(model=" , ")
    only_alias = ServingSettings(all_models="champion")
    assert only_alias.model_references == [] and only_alias.model_name is None
    assert ServingSettings(model="a@x, b/3").model_references == ["a@x", "b/3"]


def test_discovery_reads_sqlite_and_rest_alike(registry, registered, mlflow_server, team):
    assert registry_for(registry.uri).models_with_alias("team") == [
        "team_a",
        "team_broken",
        "team_multi",
    ]
    wait_for(lambda: _answers(f"{mlflow_server}/health"), 120, 0.5)  # it may still boot
    assert registry_for(mlflow_server).models_with_alias("team") == [
        "team_a",
        "team_broken",
        "team_multi",
    ]
    assert registry_for(registry.uri).models_with_alias("no-such-alias") == []


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def test_each_model_by_name_and_invocations_on_the_first(team, local_session):
    endpoint, versions = team
    features = np.random.default_rng(3).normal(size=(2, 64)).astype(np.float32)
    expected = local_session("mlp").run(None, {"features": features})[0]
    with endpoint.client() as http:
        infer = http.post(
            "/v2/models/team_a/infer",
            json=v2_request(features=features),
        )
        assert infer.status_code == 200, infer.text
        assert infer.headers["x-model-name"] == "team_a"
        np.testing.assert_allclose(
            np.array(infer.json()["outputs"][0]["data"]).reshape(2, 10),
            expected,
            rtol=1e-5,
            atol=1e-5,
        )

        example = http.get("/v2/models/team_multi/example").json()
        multi = http.post("/v2/models/team_multi/invocations", json=example)
        assert multi.status_code == 200, multi.text
        assert multi.headers["x-model-name"] == "team_multi"
        assert set(multi.json()["predictions"]) == {
            "masked",
            "inverted",
            "ids_doubled",
            "half_doubled",
            "small_out",
            "wide_doubled",
            "names_out",
        }

        first = http.post("/invocations", json=ROW)  # the first named model: digits
        assert first.status_code == 200 and first.headers["x-model-name"] == "digits"
        named = http.post("/v2/models/team_a/invocations", json=ROW)
        assert named.status_code == 200 and named.headers["x-model-name"] == "team_a"

        unknown = http.post("/v2/models/nope/invocations", json=ROW)
        assert unknown.status_code == 404
        assert "Request for unknown model: 'nope'" in unknown.json()["error"]
        assert "'team_a'" in unknown.json()["error"]  # names what is served


def test_a_broken_model_is_refused_and_the_others_serve(team):
    endpoint, versions = team
    with endpoint.client() as http:
        assert http.get("/v2/health/ready").status_code == 200
        broken = http.get("/v2/models/team_broken/ready")
        assert broken.status_code == 503, broken.text
        status = http.get("/admin/status").json()
        assert "sha256" in status["models"]["team_broken"]["refused"][versions["team_broken"]]
        assert status["models"]["team_a"]["serving"]["version"] == versions["team_a"]
        assert status["model"] == "digits@champion"  # the first named model at the top
        metrics = http.get("/metrics").text
    pattern = (
        rf'onnxflow_model_refusals_total{{model="team_broken",'
        rf'version="{versions["team_broken"]}"}} (\S+)'
    )
    assert float(re.search(pattern, metrics).group(1)) >= 1


def test_new_models_with_the_alias_are_picked_up(team, registry, model_files):
    endpoint, _ = team
    version = registry.register("team_late", model_files["mlp_v3"], _example(), aliases=("team",))
    with endpoint.client() as http:
        wait_for(lambda: http.get("/v2/models/team_late/ready").status_code == 200, 60)
        response = http.post(
            "/v2/models/team_late/infer",
            json=v2_request(features=np.full((1, 64), 0.5, np.float32)),
        )
    assert response.status_code == 200 and response.headers["x-model-version"] == version


def test_each_model_follows_its_own_alias(team, registry, model_files):
    endpoint, versions = team
    newer = registry.register("team_a", model_files["mlp_v2"], _example(), aliases=())
    registry.set_alias("team_a", "team", newer)
    with endpoint.client() as http:
        wait_for(
            lambda: (
                http.post("/v2/models/team_a/invocations", json=ROW).headers.get("x-model-version")
                == newer
            ),
            60,
        )
        multi = http.get("/v2/models/team_multi/ready")
        assert multi.headers["x-model-version"] == versions["team_multi"]
        reload = http.post("/admin/reload", params={"model": "team_multi"})
        assert reload.status_code == 200 and reload.json()["outcome"] == "unchanged"
