"""The table a user reads after a run, built from the registry's version tags.

The flow's Prefect artifact, the end of ``onnxflow run`` and ``onnxflow models`` all
show this same table, so what a run printed can always be checked against the registry.
"""

from __future__ import annotations

from collections.abc import Sequence

COLUMNS = (
    "version",
    "framework",
    "metric",
    "framework value",
    "onnxruntime value",
    "parity max abs",
    "latency ms b1 (onnx / fw)",
    "nodes (before → after)",
    "aliases",
)


def version_rows(model_name: str, versions: Sequence[str] | None = None) -> list[dict[str, str]]:
    """One row per version (all versions, newest first, unless ``versions`` is given)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    if versions is None:
        found = client.search_model_versions(f"name='{model_name}'")
    else:
        found = [client.get_model_version(model_name, str(v)) for v in versions]
    aliases = _aliases(client, model_name)
    rows = []
    for mv in sorted(found, key=lambda v: -int(v.version)):
        t = mv.tags
        metric = t.get("metric_name", "accuracy")
        rows.append(
            {
                "version": str(mv.version),
                "framework": t.get("source_framework", "?"),
                "metric": metric,
                "framework value": _pct(t.get(f"framework_{metric}"), metric),
                "onnxruntime value": _pct(t.get(metric), metric),
                "parity max abs": t.get("parity_max_abs", "-"),
                "latency ms b1 (onnx / fw)": (
                    f"{t.get('latency_ms_onnx_b1', '-')} / {t.get('latency_ms_framework_b1', '-')}"
                ),
                "nodes (before → after)": (
                    f"{t.get('nodes_before', '-')} → {t.get('nodes_after', '-')}"
                ),
                "aliases": ", ".join(sorted(aliases.get(str(mv.version), []))),
            }
        )
    return rows


def to_markdown(rows: list[dict[str, str]], title: str = "") -> str:
    lines = [f"## {title}", ""] if title else []
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    lines += ["| " + " | ".join(row[c] for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict[str, str]], title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title or None)
    for column in COLUMNS:
        table.add_column(column, justify="right" if column != "framework" else "left")
    for row in rows:
        style = "bold green" if "champion" in row["aliases"] else None
        table.add_row(*(row[c] for c in COLUMNS), style=style)
    Console(width=160).print(table)


def _aliases(client, model_name: str) -> dict[str, list[str]]:
    model = client.get_registered_model(model_name)
    by_version: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        by_version.setdefault(str(version), []).append(alias)
    return by_version


def _pct(value: str | None, metric: str) -> str:
    if value is None:
        return "-"
    try:
        number = float(value)
    except ValueError:  # e.g. an imported ONNX model's parity: "not checked"
        return value
    return f"{number:.2%}" if metric == "accuracy" else f"{number:.4g}"
