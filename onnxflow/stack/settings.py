"""Settings of the local stack, read once in the entry point from ``ONNXFLOW_STACK_*``.

Every port, database URL and the schedule live here so that ``make up``, the tests,
docker-compose and the Kubernetes manifests all set the same variables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from onnxflow.monitor import RetrainPolicy
from onnxflow.recipes import EXAMPLES_DIR

#: The names of the two deployments of the flow (``onnxflow.flows.FLOW_NAME``).
SCHEDULED = "scheduled"
ON_DEMAND = "on-demand"


class MonitorSpec(BaseModel):
    """How the stack's scheduled monitor watches one model (a key of ``monitor_config``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: RetrainPolicy = Field(
        RetrainPolicy(), description="When to retrain, and the gate's shadow evidence."
    )
    promotion: Literal["auto", "review"] = Field(
        "auto",
        description="auto: the pipeline moves champion onto a retrained challenger that "
        "beats it on the common evaluation set; review: a reviewer does.",
    )
    since: str = Field("1h", description="The window each run reads (30m, 6h, 2d).")
    retrain: bool = Field(True, description="Act on the evidence; false: report only.")


class StackSettings(BaseSettings):
    """Where the stack's servers listen and what they store; ``ONNXFLOW_STACK_<FIELD>``."""

    # hide_input_in_errors: a database URL carries its password; keep it out of messages.
    model_config = SettingsConfigDict(
        env_prefix="ONNXFLOW_STACK_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    host: str = Field("127.0.0.1", description="Interface every server binds.")
    state_dir: Path = Field(
        Path(".onnxflow/stack"),
        description="Pids, ports, logs, SQLite stores and artifacts of the running stack.",
    )
    prefect_port: int = Field(4200, ge=1, le=65535, description="Prefect server (API and UI).")
    mlflow_port: int = Field(5000, ge=1, le=65535, description="MLflow tracking server and UI.")
    endpoint_ports: list[int] = Field(
        [8080], min_length=0, description="One serving replica per port, each following the alias."
    )
    run_endpoints: list[str] | None = Field(
        None,
        description="Replica URLs a retrain run waits for until they serve the new champion "
        "(set where runs reach replicas by another name, e.g. in docker-compose); "
        "None: endpoint_urls.",
    )
    mlflow_database_url: SecretStr | None = Field(
        None,
        description="MLflow backend store, e.g. postgresql://user@host:5432/mlflow; "
        "None: SQLite in state_dir.",
    )
    prefect_database_url: SecretStr | None = Field(
        None,
        description="Prefect server database, e.g. postgresql+asyncpg://user@host:5432/prefect; "
        "None: SQLite in state_dir.",
    )
    mlflow_workers: int = Field(1, ge=1, description="Worker processes of the MLflow server.")
    auth: bool = Field(
        True,
        description="Run MLflow with authentication and the promotion policy "
        "(accounts: admin, pipeline, endpoint, reviewer); false: an open server.",
    )
    credentials_dir: Path | None = Field(
        None,
        description="One file per account holding its password (0600), created when "
        "missing; None: state_dir/credentials. ONNXFLOW_AUTH_<ACCOUNT>_PASSWORD overrides.",
    )
    promotion_policy: Path | None = Field(
        None,
        description="YAML promotion policy the MLflow server enforces on aliases "
        "(who may move champion, the evidence, four eyes); None: the defaults.",
    )
    auth_database_url: SecretStr | None = Field(
        None,
        description="MLflow's user and permission store; None: the MLflow database "
        "when it is PostgreSQL, else SQLite in state_dir.",
    )
    work_pool: str = Field("onnxflow-process", description="Prefect process work pool.")
    worker_query_s: float = Field(
        2.0, gt=0, description="Seconds between the worker's polls for runs to start."
    )
    model: str = Field(
        "digits@champion",
        description="What the serving replicas follow first (it answers their /invocations).",
    )
    all_models: str | None = Field(
        "champion",
        description="The replicas also serve every registered model with this "
        "alias (one endpoint for all models); None: only `model`.",
    )
    poll_interval_s: float = Field(
        10.0, gt=0, description="Seconds between the replicas' alias checks."
    )
    shadow: str | None = Field(
        "challenger",
        description="The replicas run the version holding this alias in shadow (onnxflow "
        "serve --shadow): a retrained challenger's live evidence; None: no shadow.",
    )
    shadow_flush_interval_s: float = Field(
        60.0,
        ge=0,
        description="Seconds between the replicas' writes of the shadow's figures onto the "
        "shadow version (the evidence the reviewer and the monitor's gate read).",
    )
    capture: bool = Field(
        True,
        description="The replicas capture what they answer into capture_dir and take "
        "feedback for it (onnxflow serve --capture); the monitor reads it. false: off.",
    )
    capture_dir: str | None = Field(
        None,
        description="Capture folder or fsspec URL every replica writes and the monitor "
        "reads; None: state_dir/captured.",
    )
    capture_fraction: float = Field(
        1.0, ge=0, le=1, description="Share of answered requests the replicas capture."
    )
    capture_segment_s: float = Field(
        60.0,
        gt=0,
        description="A capture segment is closed (readable by the monitor) this long after "
        "it opened.",
    )
    monitor_cron: str = Field(
        "*/15 * * * *",
        description="Cron of the monitor deployments (onnxflow-monitor/NAME), one per model "
        "of monitor_config.",
    )
    monitor_config: Path | None = Field(
        None,
        description="YAML: per model, its retrain policy, promotion mode and window "
        "(onnxflow.stack.settings.MonitorSpec); None: the stack's model with the defaults.",
    )
    shadow_fraction: float = Field(
        1.0, ge=0, le=1, description="Share of requests the replicas mirror to the shadow."
    )
    canary_percent: float = Field(
        0.0, ge=0, le=100, description="Percent of requests the replicas answer with challenger."
    )
    schedule_cron: str = Field(
        "0 2 * * *", description="Cron of the scheduled retrain-and-deploy (default 02:00 daily)."
    )
    schedule_timezone: str = Field("UTC", description="Time zone of schedule_cron.")
    schedule_paused: bool = Field(False, description="Create the scheduled deployment paused.")
    schedule_config: Path | None = Field(
        None, description="YAML pipeline config of the scheduled runs (default: PipelineConfig())."
    )
    recipe_dirs: list[Path] = Field(
        default_factory=lambda: [EXAMPLES_DIR],
        description="Folders whose .py files a flow run may use as its recipe (the worker "
        "imports and runs them); any other recipe fails the run before it is imported. "
        "Default: the project's examples/. Keep them writable only by whoever runs the stack.",
    )
    heartbeat_s: int = Field(
        30,
        ge=30,
        description="Seconds between a flow run's heartbeats (PREFECT_FLOWS_HEARTBEAT_FREQUENCY).",
    )
    zombie_after_s: int = Field(
        90,
        gt=0,
        description="A Running flow run without a heartbeat for this long is marked Crashed "
        "(its worker or machine died); keep it a few heartbeats long.",
    )
    startup_timeout_s: float = Field(
        120.0, gt=0, description="Longest wait for one server to become healthy."
    )

    @field_validator("endpoint_ports")
    @classmethod
    def _distinct_ports(cls, ports: list[int]) -> list[int]:
        if len(set(ports)) != len(ports):
            raise ValueError(f"endpoint_ports must be distinct, got {ports}")
        return ports

    @property
    def prefect_url(self) -> str:
        return f"http://{self.host}:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_url}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def endpoint_urls(self) -> list[str]:
        return [f"http://{self.host}:{port}" for port in self.endpoint_ports]

    @property
    def endpoints_for_runs(self) -> list[str]:
        return self.endpoint_urls if self.run_endpoints is None else self.run_endpoints

    @property
    def capture_url(self) -> str:
        return self.capture_dir or str(self.state_dir.resolve() / "captured")

    def monitored(self) -> dict[str, MonitorSpec]:
        """The models the scheduled monitor watches, from ``monitor_config``."""
        if self.monitor_config is None:
            return {self.model_name: MonitorSpec()}
        import yaml

        path = Path(self.monitor_config)
        if not path.is_file():
            raise ValueError(f"monitor_config {path} is not a file")
        raw = yaml.safe_load(path.read_text()) or {}
        return {str(name): MonitorSpec.model_validate(spec or {}) for name, spec in raw.items()}

    @property
    def model_name(self) -> str:
        return self.model.split("@")[0].split("/")[0]
