"""The docs site and the README, checked against the code.

* the site builds with ``mkdocs build --strict`` (a broken link, a page missing from the
  nav, a docstring that does not render fail it), from the ``docs`` extra;
* every ``onnxflow ...`` command line on a page or in the README is parsed by the real typer
  app: a concrete line of a shell block (``onnxflow run --sweep 8 --dask``) with click's own
  parser (option names, values, choices, arguments), a synopsis
  (``onnxflow run [--model mlp|cnn]``) and inline code in prose by their command, option
  names and choices; so a renamed option fails here, not in a user's shell;
* every command and option of ``onnxflow --help``, recursively, is on the generated CLI
  reference page;
* the recipe in the README trains, exports and validates through onnxflow's own steps;
* the README stays short, keeps the two commands, and its links lead to files.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"


def _hook(name: str):
    spec = importlib.util.spec_from_file_location(
        f"docs_hook_{name}", DOCS / "hooks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pages() -> list[Path]:
    """The README and every Markdown page of the site."""
    return [README, *sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)]


# -- the site builds, strictly -------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stderr[-6000:]}"
    return out


def test_the_site_builds_strictly_with_every_page(site):
    for page in ("index.html", "reference/cli/index.html", "reference/api/index.html"):
        assert (site / page).is_file(), page
    for md in DOCS.rglob("*.md"):
        if "hooks" in md.parts:
            continue
        rel = md.relative_to(DOCS).with_suffix("")
        html = site / ("index.html" if rel.name == "index" else f"{rel.as_posix()}/index.html")
        assert html.is_file(), f"{md.relative_to(ROOT)} was not built"


# -- every command and option of `onnxflow --help` is in the generated reference ------------


def test_every_command_and_option_is_in_the_generated_cli_reference(site):
    html = (site / "reference/cli/index.html").read_text()
    hook = _hook("cli_reference")
    checked = 0
    for path, command, _ in hook.commands():
        anchor = "-".join(path)
        start = html.find(f'id="{anchor}"')
        assert start >= 0, f"`{' '.join(path)}` has no section in the CLI reference"
        following = re.search(r'<h\d id="onnxflow[-\w]*"', html[start + 1 :])
        section = html[start : start + 1 + following.start()] if following else html[start:]
        for param in command.params:
            if param.param_type_name != "option" or getattr(param, "hidden", False):
                continue
            for name in [*param.opts, *param.secondary_opts]:
                assert f"<code>{name}</code>" in section, f"{' '.join(path)} {name} not in it"
                checked += 1
        for name in getattr(command, "commands", {}):
            assert f"#{anchor}-{name}" in section, f"{' '.join(path)}: no link to {name}"
    assert checked > 40  # the walk found the options (run alone has 16)


# -- every `onnxflow ...` on a page exists, as written ---------------------------------------


@dataclass(frozen=True)
class CommandLine:
    where: str  # file:line
    text: str  # what follows "onnxflow"
    inline: bool = False  # in prose: a name (`onnxflow convert`), not always a whole line


FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")
SHELL = {"", "bash", "sh", "shell", "console", "text"}
ONNXFLOW = re.compile(r"(?:^|(?<=[\s/;&|(]))onnxflow\s+(\S.*)")
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def _shell_lines(lines: list[str], first: int) -> list[tuple[int, str]]:
    """Logical lines of a shell block: backslash continuations and indented ``[--...``
    continuation lines (a synopsis) joined; comments dropped."""
    joined: list[tuple[int, str]] = []
    for offset, raw in enumerate(lines):
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        continues = joined and (
            joined[-1][1].endswith("\\") or re.match(r"^\s+[\[-]", line) and joined[-1][1]
        )
        if continues:
            number, before = joined[-1]
            joined[-1] = (number, before.rstrip("\\").rstrip() + " " + line.strip())
        else:
            joined.append((first + offset, line))
    return joined


def command_lines(path: Path, text: str | None = None) -> list[CommandLine]:
    """Every ``onnxflow ...`` in the shell blocks and the inline code of a page."""
    text = path.read_text() if text is None else text
    rel = path.relative_to(ROOT) if path.is_absolute() else path
    found: list[CommandLine] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence:
            end = i + 1
            while end < len(lines) and not lines[end].strip().startswith(fence.group(2)):
                end += 1
            if fence.group(3).lower() in SHELL:
                for number, line in _shell_lines(lines[i + 1 : end], i + 2):
                    line = re.sub(r"^\s*\$\s+", "", line)
                    for match in ONNXFLOW.finditer(line):
                        found.append(CommandLine(f"{rel}:{number}", match.group(1)))
            i = end + 1
            continue
        for span in INLINE.findall(lines[i]):
            match = re.match(r"^(?:\S*/)?onnxflow\s+(\S.*)", span.strip())
            if match:
                found.append(CommandLine(f"{rel}:{i + 1}", match.group(1), inline=True))
        i += 1
    return found


PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(\.[a-z]+)?$|^\.\.\.$|\.\.\.$|<[^>]+>")


def _is_synopsis(tokens: list[str]) -> bool:
    return any(
        PLACEHOLDER.search(t) or any(c in t for c in "[]|") or t.endswith("...") for t in tokens
    )


def _options(command) -> dict[str, object]:
    return {
        name: param
        for param in command.params
        if param.param_type_name == "option"
        for name in [*param.opts, *param.secondary_opts]
    }


def _choices(param) -> list[str] | None:
    """A choice option's values, read from typer's own display (``<torch|keras|...>``)."""
    shown = param.display_type(None) if callable(param.display_type) else ""
    match = re.fullmatch(r"<([\w-]+(?:\|[\w-]+)+)>", shown or "")
    return match.group(1).split("|") if match else None


def check_command_line(root, line: CommandLine) -> str | None:
    """None when the line is a command of the app, written as it parses; else the problem."""
    try:
        tokens = shlex.split(line.text)
    except ValueError:
        tokens = line.text.split()
    tokens = [t for t in tokens if t]
    command, path, ctx = root, ["onnxflow"], None
    ctx = root.context_class(root, info_name="onnxflow")
    while hasattr(command, "commands"):
        while tokens and tokens[0].startswith("-"):
            option = tokens.pop(0).split("=")[0]
            if option != "--help" and option not in _options(command):
                return f"`{' '.join(path)}` has no option {option}"
        if not tokens:
            return None
        name = tokens.pop(0)
        if PLACEHOLDER.search(name) or name in ("...", "COMMAND"):
            return None  # `onnxflow COMMAND --help`
        if name not in command.commands:
            return f"`{' '.join(path)}` has no command {name!r}"
        command, path = command.commands[name], [*path, name]
        ctx = command.context_class(command, info_name=name, parent=ctx)
    if "--help" in tokens:
        tokens = [t for t in tokens if t != "--help"]
    options = _options(command)
    if line.inline or _is_synopsis(tokens):
        for index, token in enumerate(tokens):
            name = token.strip("[]").split("=")[0]
            if not name.startswith("--"):
                continue
            if name not in options:
                return f"`{' '.join(path)}` has no option {name}"
            following = tokens[index + 1].strip("[]") if index + 1 < len(tokens) else ""
            choices = _choices(options[name])
            if choices and "|" in following:
                wrong = [c for c in following.split("|") if c not in choices]
                if wrong:
                    return f"`{' '.join(path)} {name}` has no choice {wrong} (it has {choices})"
        return None
    try:
        command.make_context(path[-1], list(tokens), parent=ctx)
    except Exception as exc:  # click's usage errors: NoSuchOption, BadParameter, Missing...
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        return f"`{' '.join(path)}`: {message}"
    return None


def test_every_onnxflow_command_line_in_the_docs_parses():
    root = _hook("cli_reference").root_command()
    lines = [line for page in pages() for line in command_lines(page)]
    assert len(lines) > 60, "the parser of the pages found too few command lines"
    problems = [
        f"{line.where}: onnxflow {line.text}\n    {p}"
        for line in lines
        if (p := check_command_line(root, line))
    ]
    assert not problems, "commands in the docs that the app does not take:\n" + "\n".join(problems)


# Options of other tools that the pages name in inline code on their own (`--serve-artifacts`).
# An option of onnxflow's is never listed here: a name missing from the app fails the test.
FOREIGN_OPTIONS = {
    "--allow-client-shm",  # Triton's server
    "--serve-artifacts",  # mlflow server
    "--in-pod",  # podman-compose
    "--only",  # bench/serve_bench.py
    "--runs",  # bench/startup_bench.py
}
BARE_OPTION = re.compile(r"^--[a-z][\w-]*")


def bare_options(path: Path, text: str | None = None) -> list[tuple[str, str]]:
    """(file:line, option) for inline code that starts with an option (`--grpc-port 8081`)."""
    text = path.read_text() if text is None else text
    rel = path.relative_to(ROOT) if path.is_absolute() else path
    found = []
    for number, line in enumerate(text.split("\n"), 1):
        for span in INLINE.findall(line):
            if BARE_OPTION.match(span):
                for option in re.findall(r"(?:^|[\s/\[(])(--[a-z][\w-]*)", span):
                    found.append((f"{rel}:{number}", option))
    return found


def all_options(root) -> set[str]:
    names = {"--help"}
    for _, command, _ in _hook("cli_reference").commands(root):
        names.update(_options(command))
    return names


def test_every_option_named_alone_in_the_docs_is_an_option_of_the_app():
    known = all_options(_hook("cli_reference").root_command()) | FOREIGN_OPTIONS
    named = [found for page in pages() for found in bare_options(page)]
    assert len(named) > 20, "the parser of the pages found too few options"
    unknown = [f"{where}: {option}" for where, option in named if option not in known]
    assert not unknown, (
        "options named in the docs that no onnxflow command has (another tool's option, named "
        "alone in inline code, goes into FOREIGN_OPTIONS):\n" + "\n".join(unknown)
    )


def test_the_option_check_fails_on_an_option_the_app_does_not_have():
    known = all_options(_hook("cli_reference").root_command())
    named = bare_options(Path("page.md"), "Add `--grpc-portt 8081` (or `--shadow challenger`).")
    assert [option for _, option in named] == ["--grpc-portt", "--shadow"]
    assert [option for _, option in named if option not in known] == ["--grpc-portt"]


@pytest.mark.parametrize(
    "markdown",
    [
        "```bash\nonnxflow serve --model digits@champion --grpc-portt 8081\n```",
        "```bash\nonnxflow run [--framework torch|tf] [--data PATH]\n```",
        "Run `onnxflow run --sweep 8 --dask-adress tcp://h:8786` on a cluster.",
        "```bash\nonnxflow trigger --wait \\\n    --framwork torch\n```",
        "```\nonnxflow promote digits\n```",  # a missing argument
        "```bash\nonnxflow stack restart\n```",
    ],
)
def test_the_command_check_fails_on_a_name_the_app_does_not_have(markdown):
    root = _hook("cli_reference").root_command()
    lines = command_lines(Path("page.md"), markdown)
    assert lines, markdown
    assert any(check_command_line(root, line) for line in lines), markdown


# -- the code runs -------------------------------------------------------------------------


def readme_recipe() -> str:
    blocks = re.findall(r"```python\n(# my_recipe\.py\n.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 1, "the README's recipe block (first line `# my_recipe.py`)"
    return blocks[0]


def test_the_readme_recipe_trains_exports_and_validates(tmp_path):
    from onnxflow.config import DataConfig, TrainConfig, ValidateConfig
    from onnxflow.recipes.steps import prepare_recipe_data
    from onnxflow.sources import RecipeSource, validate_sourced

    recipe = tmp_path / "my_recipe.py"
    recipe.write_text(readme_recipe())
    # as `onnxflow run --recipe my_recipe.py --epochs 3` does it, without Prefect and MLflow
    dataset = prepare_recipe_data(str(recipe), DataConfig(), tmp_path / "data")
    source = RecipeSource(recipe=str(recipe), dataset=dataset, train_config=TrainConfig(epochs=3))
    model = source.export(source.train(tmp_path / "train"), tmp_path / "source")
    path = model.exported.path
    summary = validate_sourced(source, model, path, ValidateConfig(), tmp_path / "v")
    assert summary.passed, summary
    assert summary.metric_name == "accuracy" and summary.onnx_metric > 0.8, summary


# -- the README ----------------------------------------------------------------------------


def test_the_readme_is_short_and_keeps_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 200, len(text.splitlines())
    for command in ("make demo", "make test"):
        assert re.search(rf"^{command}\b", text, flags=re.M), f"`{command}` in a code block"


def test_the_readme_links_lead_to_files_in_the_site():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if not re.match(r"^[a-z]+://", link)]
    assert len(local) > 10, local
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, missing
    nav = (ROOT / "mkdocs.yml").read_text()
    outside = [link for link in local if link.startswith("docs/") and link[5:] not in nav]
    assert not outside, f"README links to pages that are not in the site's nav: {outside}"


def readme_shell_lines() -> list[str]:
    """The README's shell lines that start with ``onnxflow``, as a user would paste them."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for _, line in _shell_lines(block.split("\n"), 1):
            if line.startswith("onnxflow "):
                lines.append(line.strip())
    return lines


#: The README's lines that run offline on a fresh project, in this order (the rest need a
#: data file of the user's, a server, or the stack).
OFFLINE = (
    "onnxflow run --recipe my_recipe.py",
    "onnxflow models digits",
    "onnxflow promote digits",
)


@pytest.mark.slow
def test_the_readme_recipe_runs_through_the_cli_as_written(tmp_path, _migrated_db):
    """The README's own lines, pasted into a shell in a fresh folder: the recipe block saved
    as my_recipe.py, then run, models, promote, through Prefect and MLflow."""
    import os
    import shutil

    lines = [
        next(line for line in readme_shell_lines() if line.startswith(start)) for start in OFFLINE
    ]
    (tmp_path / "my_recipe.py").write_text(readme_recipe())
    shutil.copyfile(_migrated_db, tmp_path / "mlflow.db")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "ONNXFLOW_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        ONNXFLOW_PREFECT_SERVER="temporary",
        PREFECT_HOME=str(tmp_path / "prefect-home"),
    )
    outputs = []
    for line in lines:
        done = subprocess.run(
            ["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, f"{line}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)
    assert "champion" in outputs[1], outputs[1]  # the recipe's version, promoted


def config_blocks() -> list[tuple[str, str]]:
    """(file:line, text) of every YAML block on the pages that is an ``onnxflow run --config``
    file: one whose top-level keys include a section of PipelineConfig."""
    import yaml

    from onnxflow.config import PipelineConfig

    sections = {field.alias or name for name, field in PipelineConfig.model_fields.items()}
    found = []
    for page in pages():
        text = page.read_text()
        for match in re.finditer(r"```ya?ml\n(.*?)```", text, flags=re.S):
            loaded = yaml.safe_load(match.group(1))
            if isinstance(loaded, dict) and sections & set(loaded):
                line = text[: match.start()].count("\n") + 2
                found.append((f"{page.relative_to(ROOT)}:{line}", match.group(1)))
    return found


def test_every_config_file_on_the_pages_is_a_valid_config():
    """A renamed or removed key of the YAML config fails here (unknown keys are errors)."""
    import yaml

    from onnxflow.config import PipelineConfig

    blocks = config_blocks()
    assert len(blocks) >= 3, blocks
    problems = []
    for where, text in blocks:
        try:
            PipelineConfig.model_validate(yaml.safe_load(text))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    assert not problems, "\n".join(problems)
