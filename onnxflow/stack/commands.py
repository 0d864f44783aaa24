"""``onnxflow stack up|status|down|deploy``: the local stack from the command line.

Settings come from ``ONNXFLOW_STACK_*`` (see :class:`StackSettings`), read here in the
entry point.
"""

from __future__ import annotations

import logging

import typer

from onnxflow.errors import OnnxflowError

stack_app = typer.Typer(
    help="The local service stack: MLflow and Prefect servers, worker, deployments, endpoint.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _settings():
    from pydantic import ValidationError

    from onnxflow.stack.settings import StackSettings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)-7s %(name)s: %(message)s")
    try:
        return StackSettings()
    except ValidationError as exc:
        typer.secho(f"error: invalid ONNXFLOW_STACK_* settings:\n{exc}", fg="red", err=True)
        raise typer.Exit(2) from None


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@stack_app.command()
def up() -> None:
    """Start the stack on this machine and wait until every part is healthy."""
    from onnxflow.stack import manager

    settings = _settings()
    typer.echo(f"starting the stack (state in {manager.state_dir(settings)})")
    try:
        manager.up(settings, progress=lambda line: typer.echo(f"  ✓ {line}"))
    except OnnxflowError as exc:
        _fail(exc)
    _print_urls(settings)


@stack_app.command()
def down() -> None:
    """Stop every process `up` started (and the processes they started)."""
    from onnxflow.stack import manager

    settings = _settings()
    stopped = manager.down(settings, progress=lambda line: typer.echo(f"  {line}"))
    typer.echo("stack stopped" if stopped else "nothing was running")


@stack_app.command()
def status() -> None:
    """What runs, where, and what each part reports; exit code 1 if anything is down."""
    from onnxflow.stack import manager

    settings = manager.running_settings(_settings())
    rows = manager.status(settings)
    if not rows:
        typer.echo("the stack is not running (start it with `make up`)")
        return
    for row in rows:
        mark = "✓" if row["running"] else "✗"
        typer.echo(
            f"  {mark} {row['name']:<16} pid {row['pid']:<7} {row['url']:<24} "
            f"{row['detail'] if row['running'] else 'NOT RUNNING, log: ' + row['log']}"
        )
    _print_urls(settings)
    if not all(row["running"] for row in rows):
        raise typer.Exit(1)


@stack_app.command()
def deploy() -> None:
    """Create or update the work pool and deployments on a running Prefect server
    (what `up` does; for servers started otherwise, e.g. docker-compose)."""
    from onnxflow.stack.deployments import apply_deployments

    settings = _settings()
    try:
        names = apply_deployments(settings)
    except OnnxflowError as exc:
        _fail(exc)
    typer.echo(f"deployed {', '.join(names)} to {settings.prefect_url} (pool {settings.work_pool})")


def _print_urls(settings) -> None:
    typer.echo(f"\n  Prefect UI   {settings.prefect_url}\n  MLflow UI    {settings.mlflow_url}")
    for url in settings.endpoint_urls:
        typer.echo(f"  endpoint     {url}   (model {settings.model})")


def _run_tickets(settings, config, count: int) -> list[str]:
    """One ticket per version the run may create, from the MLflow server, as the person
    running the command (their MLFLOW_TRACKING_USERNAME/PASSWORD): the server stamps the
    versions ``requested_by`` that person (four eyes compares against it)."""
    import os

    from onnxflow.stack.tickets import request_ticket

    if not os.environ.get("MLFLOW_TRACKING_USERNAME"):
        typer.echo(
            "warning: MLFLOW_TRACKING_USERNAME is not set, so no run ticket: the versions "
            "will not say who asked for them (four eyes then knows only the pipeline). "
            "Set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD to your own account.",
            err=True,
        )
        return []
    from onnxflow.explain import check_tracking_store

    name = config.register_.model_name
    try:
        # at once: MLflow's client alone retries a refused connection for about 4 minutes
        check_tracking_store(settings.mlflow_url)
        return [request_ticket(name, settings.mlflow_url) for _ in range(max(count, 1))]
    except Exception as exc:
        reason = exc.__cause__ or exc  # the check's: the connection's own error
        _fail(
            RuntimeError(
                f"no run ticket from the MLflow server at {settings.mlflow_url} (is the stack "
                f"up? are MLFLOW_TRACKING_USERNAME/PASSWORD your account?): "
                f"{type(reason).__name__}: {reason}"
            )
        )


def trigger_run(
    frameworks: list[str], config, wait: bool, timeout_s: float | None, sweep: bool = False
) -> None:
    """Create an on-demand run; with ``wait``, report how it ended and what is served."""
    import time

    from onnxflow.endpoints import serving_version
    from onnxflow.stack.deployments import config_parameter, trigger
    from onnxflow.stack.manager import running_settings

    settings = running_settings(_settings())
    # No "endpoints": the deployment's own (set by `stack up` / `stack deploy`, which know how
    # runs reach the replicas: http://endpoint:8080 in docker-compose, not this machine's URL).
    parameters = {"frameworks": frameworks, "config": config_parameter(config)}
    if sweep:
        parameters["sweep"] = True
    parameters["run_tickets"] = _run_tickets(settings, config, 1 if sweep else len(frameworks))
    started = time.perf_counter()
    try:
        run = trigger(settings, parameters, wait=wait, timeout_s=timeout_s)
    except Exception as exc:  # no server, unknown deployment: say where we looked
        _fail(
            RuntimeError(
                f"cannot run the on-demand deployment on {settings.prefect_url} "
                f"(is the stack up? `make status`): {exc}"
            )
        )
    typer.echo(f"flow run {run.name}: {settings.prefect_url}/runs/flow-run/{run.id}")
    if not wait:
        return
    state = run.state
    note = f": {state.message}" if state and state.message else ""
    typer.echo(
        f"finished {state.type.value if state else 'UNKNOWN'} after "
        f"{time.perf_counter() - started:.1f} s{note}"
    )
    name = config.register_.model_name
    for url in settings.endpoint_urls:
        version = serving_version(url, name)
        typer.echo(f"  {url} serves {name} v{version}" if version else f"  {url}: no version")
    if state is None or not state.is_completed():
        raise typer.Exit(1)
