"""infra/ checked without a container engine (the images are built and run by the slow tests
in tests/integration/test_images.py): every file parses, every command and module it names
exists in the project, every environment variable it sets is one that a settings class
(ours, Prefect's, MLflow's) reads, and the Kubernetes manifests validate against the current
Kubernetes schema."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
BIN = Path(sys.executable).parent
#: Variables read by Python, pip, the shell or the postgres image, not by a settings class.
OUTSIDE_SETTINGS = {
    "PYTHONUNBUFFERED",
    "PIP_NO_CACHE_DIR",
    "TF_CPP_MIN_LOG_LEVEL",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "POSTGRES_DB",
    "PATH",
    "VIRTUAL_ENV",
}


def compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def k8s_documents() -> list[dict]:
    return [
        doc
        for path in sorted((INFRA / "k8s").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (INFRA / name).read_text())
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def docker_env(name: str) -> dict[str, str]:
    env = {}
    for instruction, args in dockerfile(name):
        if instruction == "ENV":
            env.update(dict(item.split("=", 1) for item in shlex.split(args)))
    return env


@cache
def prefect_setting_names() -> frozenset[str]:
    from prefect.settings import Settings
    from prefect.settings.legacy import _get_valid_setting_names

    return frozenset(_get_valid_setting_names(Settings))


def read_by_settings(name: str) -> bool:
    import mlflow.environment_variables as mlflow_env

    from onnxflow.config import Settings
    from onnxflow.serving.settings import ServingSettings
    from onnxflow.stack.settings import StackSettings

    for prefix, cls in (
        ("ONNXFLOW_SERVE_", ServingSettings),
        ("ONNXFLOW_STACK_", StackSettings),
        ("ONNXFLOW_", Settings),
    ):
        if name.startswith(prefix):
            return name[len(prefix) :].lower() in cls.model_fields
    if name.startswith("PREFECT_"):
        return name in prefect_setting_names()
    if name.startswith("MLFLOW_"):
        return hasattr(mlflow_env, name)
    return name in OUTSIDE_SETTINGS


def test_every_file_parses():
    files = sorted(p for p in INFRA.rglob("*") if p.is_file())
    names = {p.relative_to(INFRA).as_posix() for p in files}
    assert {
        "Dockerfile",
        "Dockerfile.serving",
        "docker-compose.yml",
        "k8s/serving.yaml",
        "k8s/prefect-base-job-template.json",
    } <= names
    for path in files:
        if path.suffix in (".yml", ".yaml"):
            assert list(yaml.safe_load_all(path.read_text())), path
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.name.startswith("Dockerfile"):
            instructions = [i for i, _ in dockerfile(path.name) if i != "ARG"]
            assert instructions[0] == "FROM", path


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.serving"])
def test_dockerfiles_copy_what_exists_and_install_known_extras(name):
    extras = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    for instruction, args in dockerfile(name):
        if instruction == "COPY":
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"{name}: COPY {source}: no such path"
        if instruction == "RUN" and "pip install" in args:
            for wanted in re.findall(r'"\.\[([^\]]+)\]"', args):
                assert set(wanted.split(",")) <= extras, f"{name}: unknown extra in {args}"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.serving"])
def test_dockerfiles_take_their_base_image_as_a_build_argument(name):
    steps = dockerfile(name)
    args = dict(a.split("=", 1) for i, a in steps if i == "ARG" and "=" in a)
    assert args["BASE_IMAGE"] == "python:3.11-slim", "the official image stays the default"
    assert ("FROM", "${BASE_IMAGE}") in steps
    # Debian's own Python is externally managed (PEP 668): everything goes into a venv.
    assert ("RUN", "python3 -m venv /opt/onnxflow") in steps


def test_the_serving_image_installs_only_the_base_dependencies():
    runs = [args for instruction, args in dockerfile("Dockerfile.serving") if instruction == "RUN"]
    installs = [c.strip() for args in runs for c in args.split("&&") if "pip install" in c]
    assert installs == ["pip install ."], "the slim image takes no extras"
    # the capture's C extension is compiled there, and the build fails without it
    assert any("import onnxflow.serving._capture" in args for args in runs)
    base = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    heavy = [d for d in base if re.match(r"(torch|tensorflow|pandas|mlflow)([<>=~!\[ ;]|$)", d)]
    assert not heavy, f"base (serving) dependencies must stay slim: {heavy}"
    entry = dict(dockerfile("Dockerfile.serving"))["ENTRYPOINT"]
    assert json.loads(entry) == ["python", "-m", "onnxflow.serving"]
    assert (ROOT / "serving" / "__main__.py").is_file()


def test_every_command_names_an_existing_program_and_subcommand():
    commands = [
        service["command"] for service in compose()["services"].values() if "command" in service
    ]
    commands.append(json.loads(dict(dockerfile("Dockerfile"))["CMD"]))
    for command in commands:
        assert (BIN / command[0]).is_file(), f"no {command[0]} in the environment: {command}"
    # `onnxflow stack deploy`, `prefect worker start`, ...: each answers --help.
    subcommands = {tuple(c[:3]) if c[0] != "mlflow" else tuple(c[:2]) for c in commands}
    for sub in subcommands:
        out = subprocess.run(
            [BIN / sub[0], *sub[1:], "--help"], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, f"{' '.join(sub)} --help: {out.stderr[-500:]}"
        options = [
            a.split("=")[0]
            for c in commands
            if tuple(c[: len(sub)]) == sub
            for a in c[len(sub) :]
            if a.startswith("--")
        ]
        for option in options:
            assert option in out.stdout, f"{' '.join(sub)} has no option {option}"


def test_every_environment_variable_is_read_by_a_settings_class():
    sets: dict[str, set[str]] = {}
    for service_name, service in compose()["services"].items():
        for name in service.get("environment", {}):
            sets.setdefault(name, set()).add(f"docker-compose {service_name}")
    for name in ("Dockerfile", "Dockerfile.serving"):
        for var in docker_env(name):
            sets.setdefault(var, set()).add(name)
    for doc in k8s_documents():
        for container in (
            doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
        ):
            for var in container.get("env", []):
                sets.setdefault(var["name"], set()).add(f"k8s {doc['metadata']['name']}")
    template = json.loads((INFRA / "k8s" / "prefect-base-job-template.json").read_text())
    for container in template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][
        "containers"
    ]:
        for var in container["env"]:
            sets.setdefault(var["name"], set()).add("prefect job template")
    unknown = {name: where for name, where in sets.items() if not read_by_settings(name)}
    assert not unknown, f"set but read by no settings class: {unknown}"
    assert {
        "MLFLOW_TRACKING_URI",
        "ONNXFLOW_SERVE_MODEL",
        "PREFECT_API_URL",
        "PREFECT_API_DATABASE_CONNECTION_URL",
        "ONNXFLOW_STACK_RUN_ENDPOINTS",
    } <= set(sets)


def test_compose_values_parse_with_the_settings_that_read_them():
    from onnxflow.serving.settings import ServingSettings
    from onnxflow.stack.settings import StackSettings

    services = compose()["services"]
    stack_env = {
        k[len("ONNXFLOW_STACK_") :].lower(): v
        for k, v in services["deployments"]["environment"].items()
    }
    stack = StackSettings(
        **{k: json.loads(v) if v.startswith("[") else v for k, v in stack_env.items()}
    )
    assert stack.prefect_api_url == services["worker"]["environment"]["PREFECT_API_URL"]
    serve_env = {
        k[len("ONNXFLOW_SERVE_") :].lower(): v
        for k, v in services["endpoint"]["environment"].items()
        if k.startswith("ONNXFLOW_SERVE_")
    }
    serving = ServingSettings(**serve_env)
    assert f"http://endpoint:{serving.port}" in stack.endpoints_for_runs
    assert (
        f"${{ENDPOINT_HOST_PORT:-{serving.port}}}:{serving.port}" in services["endpoint"]["ports"]
    )
    # A live run sends heartbeats more often than the zombie automation waits for one
    # (Prefect's default, 180 s, had `stack deploy`'s automation crash live compose runs).
    worker_env = services["worker"]["environment"]
    heartbeat = int(worker_env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])
    assert heartbeat == stack.heartbeat_s and 2 * heartbeat < stack.zombie_after_s
    mlflow_url = services["worker"]["environment"]["MLFLOW_TRACKING_URI"]
    assert services["endpoint"]["environment"]["MLFLOW_TRACKING_URI"] == mlflow_url
    assert "--serve-artifacts" in services["mlflow"]["command"]
    assert services["prefect-server"]["environment"][
        "PREFECT_API_DATABASE_CONNECTION_URL"
    ].startswith("postgresql+asyncpg://")


def test_kubernetes_serving_probes_the_v2_health_routes():
    docs = {doc["kind"]: doc for doc in k8s_documents()}
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    deployment = docs["Deployment"]
    pod = deployment["spec"]["template"]
    assert (
        deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    )
    (container,) = pod["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    app_source = (ROOT / "serving" / "app.py").read_text()
    for path in ("/v2/health/ready", "/v2/health/live"):
        assert f'"{path}"' in app_source, f"the endpoint serves no {path}"
    env = {v["name"]: v.get("value") for v in container["env"]}
    (port,) = container["ports"]
    assert str(port["containerPort"]) == env["ONNXFLOW_SERVE_PORT"]
    assert docs["Service"]["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == port["name"]
    target = docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_prefect_job_template_declares_every_variable_it_uses():
    template = json.loads((INFRA / "k8s" / "prefect-base-job-template.json").read_text())
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    declared = set(template["variables"]["properties"])
    assert used <= declared, f"undeclared: {used - declared}"
    assert {"image", "mlflow_tracking_uri", "command"} <= used


def test_kubernetes_manifests_validate_against_a_current_kubernetes_schema():
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    documents = k8s_documents()
    assert {doc["kind"] for doc in documents} >= {"Deployment", "Service"}
    for doc in documents:
        kubernetes_validate.validate(doc, version, strict=True)
    # The Prefect job template, rendered the way the worker renders it: variable defaults plus
    # what the worker sets for a flow run.
    from prefect.utilities.templating import apply_values

    template = json.loads((INFRA / "k8s" / "prefect-base-job-template.json").read_text())
    values = {
        name: spec["default"]
        for name, spec in template["variables"]["properties"].items()
        if "default" in spec
    }
    values |= {
        "name": "flow-run-1",
        "command": "prefect flow-run execute",
        "labels": {"prefect.io/flow-run-id": "1"},
        "env": {"PREFECT_API_URL": "http://x"},
    }
    job = apply_values(template["job_configuration"]["job_manifest"], values)
    for container in job["spec"]["template"]["spec"]["containers"]:
        if isinstance(container.get("args"), str):  # the worker shlex-splits "{{ command }}"
            container["args"] = shlex.split(container["args"])
    kubernetes_validate.validate(job, version, strict=True)
    # The check itself catches a broken manifest (a misspelt field, a wrong type).
    broken = json.loads(json.dumps(documents[0]))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_the_local_postgres_image_takes_what_compose_gives_the_official_one():
    """infra/Dockerfile.postgres stands in for postgres:16 (POSTGRES_IMAGE): the same
    variables, init-script folder, data folder and pg_isready healthcheck."""
    service = compose()["services"]["postgres"]
    assert service["image"] == "${POSTGRES_IMAGE:-postgres:16}", "Docker Hub's stays the default"
    entrypoint = (INFRA / "postgres-entrypoint.sh").read_text()
    assert set(service["environment"]) <= set(re.findall(r"\b(POSTGRES_[A-Z]+)\b", entrypoint))
    targets = [volume.split(":")[1] for volume in service["volumes"]]
    env = docker_env("Dockerfile.postgres")
    assert env["PGDATA"] in targets
    assert any(t.startswith("/docker-entrypoint-initdb.d/") for t in targets)
    assert "/docker-entrypoint-initdb.d" in entrypoint
    assert service["healthcheck"]["test"][1] == "pg_isready"
    assert env["PATH"].startswith("/usr/lib/postgresql/15/bin:")
    steps = dockerfile("Dockerfile.postgres")
    assert any(i == "RUN" and "postgresql-15" in a for i, a in steps)
    assert ("COPY", "infra/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh") in steps


def test_the_postgres_entrypoint_initialises_and_serves_as_compose_asks():
    """The image's entrypoint, run on this machine's PostgreSQL 15 (the packages the image
    installs) with the compose file's environment and init SQL: as root it hands the data
    folder to postgres and drops root, creates the user with its password, the database and
    the init SQL's databases, then serves TCP with password authentication."""
    import os
    import shutil
    import signal
    import tempfile
    import time

    import psycopg

    from tests.integration.conftest import free_ports

    bindir = Path("/usr/lib/postgresql/15/bin")
    assert (bindir / "initdb").is_file(), "needs Debian's postgresql-15 (the stack tests' server)"
    service = compose()["services"]["postgres"]
    root = Path(tempfile.mkdtemp(prefix="onnxflow-pg-"))
    root.chmod(0o755)  # the postgres user reads the init SQL and owns the data folder below
    try:
        init = root / "initdb.d"
        init.mkdir()
        shutil.copy(INFRA / "postgres-init.sql", init / "init.sql")
        (port,) = free_ports(1)
        env = {
            "PATH": f"{bindir}:{os.environ['PATH']}",
            "PGDATA": str(root / "data"),
            "PGPORT": str(port),
            "POSTGRES_INITDB_DIR": str(init),
            **service["environment"],
        }
        log = open(root / "postgres.log", "wb")
        proc = subprocess.Popen(
            [str(INFRA / "postgres-entrypoint.sh")], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        user, password = env["POSTGRES_USER"], env["POSTGRES_PASSWORD"]
        url = f"postgresql://{user}:{password}@127.0.0.1:{port}/{env['POSTGRES_DB']}"
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, (root / "postgres.log").read_text()[-2000:]
                ready = subprocess.run(
                    [bindir / "pg_isready", "-h", "127.0.0.1", "-p", str(port), "-U", user],
                    capture_output=True,
                )
                if ready.returncode == 0:
                    break
                assert time.monotonic() < deadline, (root / "postgres.log").read_text()[-2000:]
                time.sleep(0.5)
            with psycopg.connect(url) as conn:
                names = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
                (owner,) = conn.execute("SELECT current_user").fetchone()
            assert {"onnxflow", "mlflow", "prefect"} <= names
            assert owner == user
            with pytest.raises(psycopg.OperationalError, match="password authentication"):
                psycopg.connect(url.replace(f":{password}@", ":wrong@"), connect_timeout=10)
            assert (root / "data").stat().st_uid != 0, "the server runs as postgres, not root"
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
            log.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
