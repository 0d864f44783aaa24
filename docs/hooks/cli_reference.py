"""MkDocs hook: the CLI reference, rendered from the typer app in ``onnxflow/cli.py``.

A page holding the marker ``<!-- onnxflow-cli -->`` gets, in its place, every command of
``onnxflow`` (recursively: ``onnxflow stack up`` too) with its help, usage, arguments and
options (names, type or choices, default, environment variable), taken from the click
command tree typer builds. Nothing in it is written by hand, so a renamed option is
renamed here too. ``tests/test_docs.py`` imports :func:`commands` and :func:`render`.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

MARKER = "<!-- onnxflow-cli -->"


def root_command() -> Any:
    """The click command tree of ``onnxflow`` (typer ships its own click: duck-typed)."""
    import typer.main

    from onnxflow.cli import app

    return typer.main.get_command(app)


def commands(root: Any = None) -> Iterator[tuple[list[str], Any, Any]]:
    """(path, command, click context) of the root and every subcommand, depth first."""
    root = root_command() if root is None else root

    def walk(command: Any, path: list[str], parent: Any) -> Iterator[tuple[list[str], Any, Any]]:
        ctx = command.context_class(command, info_name=path[-1], parent=parent)
        yield path, command, ctx
        for name, sub in getattr(command, "commands", {}).items():
            if not getattr(sub, "hidden", False):
                yield from walk(sub, [*path, name], ctx)

    yield from walk(root, ["onnxflow"], None)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _kind(param: Any, ctx: Any) -> str:
    """``<torch|keras|...>``, ``<path>``...: what typer's own --help shows; nothing for flags."""
    if getattr(param, "is_flag", False):
        return "flag"
    return f"`{param.display_type(ctx)}`"


def _option_row(param: Any, ctx: Any) -> str:
    names = " / ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
    record = param.get_help_record(ctx)
    help_text = _cell(record[1] if record else "")  # with typer's [default: ...] [env var: ...]
    return f"| {names} | {_kind(param, ctx)} | {help_text} |"


def render_command(path: list[str], command: Any, ctx: Any) -> str:
    """One command's section: heading, help, usage, arguments, options, subcommands."""
    level = "#" * min(len(path) + 2, 6)
    lines = [f"{level} {' '.join(path)}", ""]
    if command.help:
        lines += [inspect.cleandoc(command.help), ""]
    usage = " ".join(command.collect_usage_pieces(ctx)).replace("{", "").replace("}", "").upper()
    usage = usage.replace("[OPTIONS]", "[OPTIONS]")
    lines += ["```text", f"{ctx.command_path} {usage}".rstrip(), "```", ""]
    arguments = [p for p in command.params if p.param_type_name == "argument"]
    options = [
        p for p in command.params if p.param_type_name == "option" and not getattr(p, "hidden", 0)
    ]
    if arguments:
        lines += ["| argument | type | required | help |", "|---|---|---|---|"]
        for p in arguments:
            help_text = _cell(getattr(p, "help", None) or "")
            lines.append(
                f"| `{p.name.upper()}` | {_kind(p, ctx)} | {'yes' if p.required else 'no'} "
                f"| {help_text} |"
            )
        lines.append("")
    if options:
        lines += ["| option | type | help |", "|---|---|---|"]
        lines += [_option_row(p, ctx) for p in options]
        lines.append("")
    subcommands = getattr(command, "commands", {})
    if subcommands:
        lines += ["| command | what |", "|---|---|"]
        for name, sub in subcommands.items():
            if not getattr(sub, "hidden", False):
                anchor = "-".join([*path, name])
                lines.append(f"| [`{name}`](#{anchor}) | {_cell(sub.get_short_help_str(80))} |")
        lines.append("")
    return "\n".join(lines)


def render(root: Any = None) -> str:
    """The whole reference: every command of the tree, in order."""
    return "\n".join(render_command(path, cmd, ctx) for path, cmd, ctx in commands(root))


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, render())
    return markdown
