"""Command-line options that cannot be honoured are errors, never silently dropped.

Click (under Typer) keeps the last value of an option given twice: ``onnxflow serve
--model a@champion --model b@champion`` would serve ``b`` without a word. Commands made
by :class:`StrictTyper` refuse an option that takes one value when it is given more than
once (``--deploy --no-deploy`` counts as twice), naming it, with the usual usage error.
"""

from __future__ import annotations

import typer
from typer.core import TyperCommand


class OnceOnlyCommand(TyperCommand):
    """A command whose single-value options may be given once."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        single = {}  # option string -> its parameter (Typer's own copy of click's Option)
        for param in self.get_params(ctx):
            if (getattr(param, "param_type_name", "") == "option" and not param.multiple
                    and not getattr(param, "count", False)):
                for opt in (*param.opts, *param.secondary_opts):
                    single[opt] = param
        given: dict[str, list[str]] = {}
        params = {}
        i = 0
        while i < len(args) and args[i] != "--":
            name, eq, _ = args[i].partition("=")
            param = single.get(name)
            i += 1
            if param is None:
                continue
            shown = args[i - 1]
            if not eq and not param.is_flag and i < len(args):
                shown += f" {args[i]}"  # its value, even if it looks like an option
                i += 1
            given.setdefault(param.name, []).append(shown)
            params[param.name] = param
        for name, tokens in given.items():
            if len(tokens) > 1:
                raise typer.BadParameter(
                    f"given {len(tokens)} times ({', '.join(tokens)}); it takes one value: "
                    "give it once", ctx=ctx, param=params[name])
        return super().parse_args(ctx, args)


class StrictTyper(typer.Typer):
    """A Typer app whose commands are :class:`OnceOnlyCommand` unless told otherwise."""

    def command(self, *args, cls: type[TyperCommand] | None = None, **kwargs):
        return super().command(*args, cls=cls or OnceOnlyCommand, **kwargs)
