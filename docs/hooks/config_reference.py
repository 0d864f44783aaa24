"""MkDocs hook: the configuration reference, rendered from the pydantic models.

A page holding ``<!-- onnxflow-config -->`` gets one table per section of the YAML file
(:class:`onnxflow.config.PipelineConfig`: key, type, default, description), and
``<!-- onnxflow-settings -->`` the environment settings (:class:`onnxflow.config.Settings`).
Keys, defaults and descriptions come from the code, so they cannot drift from it.
"""

from __future__ import annotations

import json
from typing import Any

CONFIG_MARKER = "<!-- onnxflow-config -->"
SETTINGS_MARKER = "<!-- onnxflow-settings -->"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _type_text(annotation: Any) -> str:
    """``int``, ``"auto" or "cpu"``, ``str or None``, ``dict[str, range or choice]``..."""
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " or ".join(json.dumps(a) for a in args)
    if origin is typing.Annotated:
        return _type_text(args[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_text(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_text(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "None"
    if annotation is typing.Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _type(annotation: Any) -> str:
    return _cell(_type_text(annotation))


def _default(field: Any) -> str:
    from pydantic import BaseModel
    from pydantic_core import to_jsonable_python

    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return ""
    return f"`{_cell(json.dumps(to_jsonable_python(value)))}`"


def _table(model: type, prefix: str = "") -> list[str]:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        key = field.alias or name
        lines.append(
            f"| `{prefix}{key}` | {_type(field.annotation)} | {_default(field)} "
            f"| {_cell(field.description or '')} |"
        )
    return lines


def render_config() -> str:
    """One table per section of PipelineConfig, top-level keys first."""
    from pydantic import BaseModel

    from onnxflow.config import PipelineConfig

    top, sections = [], []
    for name, field in PipelineConfig.model_fields.items():
        key = field.alias or name
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            doc = (annotation.__doc__ or "").strip().split("\n\n")[0]
            sections += [f"### `{key}:`", ""]
            if doc and doc != (BaseModel.__doc__ or "").strip().split("\n\n")[0]:
                sections += [" ".join(doc.split()), ""]
            sections += [*_table(annotation), ""]
        else:
            top.append(name)
    head = ["### Top-level keys", "", *_table_subset(PipelineConfig, top), ""]
    return "\n".join(head + sections)


def _table_subset(model: type, names: list[str]) -> list[str]:
    lines = _table(model)
    keep = {f"`{model.model_fields[n].alias or n}`" for n in names}
    return lines[:2] + [row for row in lines[2:] if row.split(" | ")[0][2:] in keep]


def render_settings() -> str:
    from onnxflow.config import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    lines = ["| environment variable | type | default | description |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        lines.append(
            f"| `{prefix}{name.upper()}` | {_type(field.annotation)} | {_default(field)} "
            f"| {_cell(field.description or '')} |"
        )
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if CONFIG_MARKER in markdown:
        markdown = markdown.replace(CONFIG_MARKER, render_config())
    if SETTINGS_MARKER in markdown:
        markdown = markdown.replace(SETTINGS_MARKER, render_settings())
    return markdown
