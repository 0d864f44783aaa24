"""The endpoint's settings: read once in the entry point from ``ONNXFLOW_SERVE_*``.

The token is deliberately an environment variable first: a command-line argument is
visible to every user of the machine through ``ps``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 1 << 20


class ServingSettings(BaseSettings):
    """How the endpoint runs; every field can be set as ``ONNXFLOW_SERVE_<FIELD>``."""

    # hide_input_in_errors: a refused value is never echoed (a too-short token is still a
    # secret, and these errors reach the endpoint's log and the caller's task state).
    model_config = SettingsConfigDict(
        env_prefix="ONNXFLOW_SERVE_",
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,
        populate_by_name=True,
    )

    model: str = Field(
        "digits@champion",
        description="Registered model(s) to serve: NAME@ALIAS (followed) or NAME/VERSION "
        "(pinned); several separated by commas. The first answers /invocations.",
    )
    all_models: str | None = Field(
        None,
        description="Also serve every registered model that has this alias (each following "
        "it), picking up new ones at every poll. Without it, `model` defaults to none.",
    )
    host: str = Field("127.0.0.1", description="Interface to bind; 0.0.0.0 only on purpose.")
    port: int = Field(8080, ge=0, le=65535, description="TCP port (0: any free port).")
    grpc_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Also serve KServe V2 / Triton gRPC (GRPCInferenceService) on this port; "
        "0: any free port (logged). None: no gRPC.",
    )
    token: SecretStr | None = Field(
        None,
        description="Bearer token for inference and admin routes; admin routes are off without.",
    )
    poll_interval_s: float = Field(
        10.0, ge=0, description="Seconds between alias checks; 0 turns the watcher off."
    )
    max_body_bytes: int = Field(
        16 * MIB, ge=1024, description="Largest request body, and largest declared tensor."
    )
    max_batch_size: int = Field(
        0, ge=0, description="Rows merged into one run by dynamic batching; 0 or 1: off."
    )
    max_batch_delay_ms: float = Field(
        2.0, ge=0, description="Longest a request waits for others to share its batch."
    )
    intra_op_threads: int | None = Field(
        None,
        ge=0,
        description="onnxruntime threads inside one run. Default: 1 without batching "
        "(concurrent requests run side by side on the worker threads), every core with "
        "batching (one merged batch runs at a time). 0: onnxruntime decides.",
    )
    inference_threads: int = Field(
        2, ge=1, description="Worker threads for runs too slow to run on the event loop."
    )
    inline_run_ms: float = Field(
        0.5,
        ge=0,
        description="Models whose warm batch-1 run takes less than this run on the event loop "
        "(a thread hop costs more than the run itself); slower ones run in worker threads.",
    )
    providers: Literal["auto", "cpu"] = Field(
        "auto", description="auto: CUDA when onnxruntime has it, then CPU; cpu: CPU only."
    )
    cache_dir: Path = Field(
        Path(".onnxflow/serve/models"),
        description="Downloaded versions, kept by NAME/VERSION so a restart starts fast.",
    )
    tracking_uri: str | None = Field(
        None,
        validation_alias=AliasChoices("ONNXFLOW_SERVE_TRACKING_URI", "MLFLOW_TRACKING_URI"),
        description="The MLflow tracking URI the models are read from (read once, here: "
        "ONNXFLOW_SERVE_TRACKING_URI, else MLFLOW_TRACKING_URI). None: MLflow's default.",
    )
    registry_access: Literal["auto", "rest", "sqlite", "mlflow"] = Field(
        "auto",
        description="How alias checks read the registry (the endpoint never imports MLflow): "
        "auto: MLflow's REST API for http(s) tracking URIs, the SQLite file read-only for "
        "sqlite:///, a helper process with MLflow's client otherwise; rest, sqlite or "
        "mlflow (the helper) force one.",
    )
    shared_memory: bool = Field(
        False,
        description="Serve Triton's system shared-memory extension: clients on this host "
        "register POSIX shared-memory objects (/dev/shm) and pass tensors through them. Off "
        "by default (as Triton's --allow-client-shm): a registered key opens any shared-memory "
        "object this process's user can open; guard it with a token.",
    )
    require_digest: bool = Field(
        True, description="Refuse versions without an onnx_sha256 tag (set at registration)."
    )
    shadow: str | None = Field(
        None,
        description="Registry alias to run in shadow beside each served model (e.g. "
        "challenger): live requests are mirrored to the version it points at, off the request "
        "path, and compared with the served answers. None: no shadow.",
    )
    shadow_fraction: float = Field(
        1.0, ge=0, le=1, description="Share of requests mirrored to the shadow version."
    )
    shadow_queue_bytes: int = Field(
        16 * MIB,
        ge=64 * 1024,
        description="Mirrored requests waiting for the shadow's worker, in bytes; beyond this "
        "a request is not mirrored (dropped and counted).",
    )
    shadow_flush_interval_s: float = Field(
        300.0,
        ge=0,
        description="Seconds between writes of the shadow's figures onto the shadow version "
        "in the registry (tags and shadow/report.md); 0: only on POST /admin/shadow/flush.",
    )
    capture: str | None = Field(
        None,
        description="Record every answered request (inputs, outputs, latency, request id) "
        "as Parquet under this folder or fsspec URL (model=/version=/date= partitions), off "
        "the request path. None: no capture.",
    )
    capture_fraction: float = Field(
        1.0, ge=0, le=1, description="Share of answered requests captured."
    )
    capture_queue_bytes: int = Field(
        64 * MIB,
        ge=64 * 1024,
        description="Captured requests waiting for the writer, in bytes; beyond this a "
        "request is not captured (counted in onnxflow_capture_dropped_total).",
    )
    capture_flush_interval_s: float = Field(
        2.0,
        gt=0,
        description="Seconds between the capture writer's appends to its segments (each "
        "append has a fixed cost; another replica finds a request's id after it).",
    )
    capture_segment_bytes: int = Field(
        64 * MIB, ge=1024, description="A capture segment is closed past this size."
    )
    capture_segment_s: float = Field(
        300.0, gt=0, description="A capture segment is closed this long after it opened."
    )
    capture_retention_days: int = Field(
        30,
        ge=0,
        description="Capture date partitions older than this many days are deleted by the "
        "endpoint's writer; 0: kept forever.",
    )
    capture_writer: Literal["process", "thread"] = Field(
        "process",
        description="Where the capture's writer runs: a process of its own (it shares no "
        "GIL with the serving thread, and finishes its segments if the endpoint dies), or "
        "a thread of the endpoint. An in-memory filesystem (memory://) is always written "
        "from a thread.",
    )
    capture_writer_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="Niceness the capture's writer process adds to the endpoint's (0-19; "
        "the sum is capped at 19): above 0 it gives the CPU back to the serving thread and "
        "the clients as soon as they wake, so its appends do not stretch the latency of the "
        "requests beside them; at 10 it still gets a tenth of a core when every core is "
        "busy.",
    )
    canary_percent: float = Field(
        0.0,
        ge=0,
        le=100,
        description="Answer this share (percent) of each model's requests with the version "
        "holding canary_alias; 0: no canary.",
    )
    canary_alias: str = Field("challenger", description="The alias the canary answers with.")
    canary_max_error_rate: float = Field(
        0.02,
        ge=0,
        le=1,
        description="Stop the canary when its error rate exceeds the served version's by this.",
    )
    canary_max_p99_ratio: float = Field(
        2.0,
        gt=0,
        description="Stop the canary when its p99 exceeds the served one's this many times.",
    )
    canary_min_requests: int = Field(
        50, ge=1, description="Canary answers before its error rate and p99 are judged."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level of the endpoint."
    )

    @model_validator(mode="before")
    @classmethod
    def _no_default_model_with_all_models(cls, data):
        # --all-models ALIAS alone serves what has the alias, not also digits@champion.
        if isinstance(data, dict) and data.get("all_models") and "model" not in data:
            data = {**data, "model": ""}
        return data

    @field_validator("model")
    @classmethod
    def _model_reference(cls, value: str) -> str:
        names = [parse_model_reference(ref)[0] for ref in split_model_references(value)]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"model {', '.join(map(repr, repeated))} given more than once; "
                "one endpoint serves each model once (at one alias or version)"
            )
        return value

    @field_validator("all_models", "shadow")
    @classmethod
    def _alias(cls, value: str | None, info) -> str | None:
        if not value:  # "" (an emptied environment variable): off
            return None
        if "@" in value or "/" in value or "," in value:
            example = "champion" if info.field_name == "all_models" else "challenger"
            raise ValueError(
                f"{info.field_name} takes one alias name (e.g. {example}), got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _something_to_serve(self):
        if not self.model_references and not self.all_models:
            raise ValueError("nothing to serve: give a model (NAME@ALIAS) or all_models (ALIAS)")
        return self

    @property
    def model_references(self) -> list[str]:
        """The explicitly named models, in order (the first answers /invocations)."""
        return split_model_references(self.model)

    @field_validator("capture")
    @classmethod
    def _capture_location(cls, value: str | None) -> str | None:
        return value or None  # "" (an emptied environment variable): off

    @field_validator("token")
    @classmethod
    def _token_length(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 8:
            raise ValueError("the token must have at least 8 characters")
        return value

    @property
    def model_name(self) -> str | None:
        """The first named model (the one /invocations answers with), if any."""
        refs = self.model_references
        return parse_model_reference(refs[0])[0] if refs else None

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1

    @property
    def session_threads(self) -> int:
        if self.intra_op_threads is not None:
            return self.intra_op_threads
        return (os.cpu_count() or 1) if self.batching else 1


def split_model_references(value: str) -> list[str]:
    """``"a@champion, b/3"`` -> ``["a@champion", "b/3"]``."""
    return [ref.strip() for ref in value.split(",") if ref.strip()]


def parse_model_reference(ref: str) -> tuple[str, str | None, str | None]:
    """``NAME@ALIAS`` -> (name, alias, None); ``NAME/VERSION`` -> (name, None, version)."""
    if "@" in ref:
        name, _, alias = ref.partition("@")
        if name and alias and "/" not in alias:
            return name, alias, None
    elif "/" in ref:
        name, _, version = ref.rpartition("/")
        if name and version.isdigit():
            return name, None, version
    raise ValueError(
        f"model reference {ref!r}: expected NAME@ALIAS (e.g. digits@champion) "
        "or NAME/VERSION (e.g. digits/3)"
    )
