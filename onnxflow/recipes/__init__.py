"""Recipes: the user's own model code in onnxflow's loop.

A recipe is a plain Python file (or an importable module) with no Prefect or MLflow in it:

* ``build_model(info)`` or ``build_model(info, params)`` (required) -> a
  ``torch.nn.Module`` or a ``keras.Model`` whose output is the class scores (logits)
  ``[batch, n_classes]``. ``info`` is :class:`onnxflow.arrays.ArrayDatasetInfo`:
  ``info.inputs`` (name, shape without the batch axis, dtype, in the order the model takes
  them), ``info.class_names``, ``info.n_classes``. ``params`` is the dict ``train.params``:
  the recipe's own parameters (width, dropout, ...), which a sweep can search
  (``sweep.space: {params.width: {choices: [32, 64]}}``).
* ``load_data(config)`` (optional) -> :class:`onnxflow.arrays.NamedArrays` or a dict
  ``{"train": {...}, "validation": {...}, "test": {...}, "classes": [...]}`` of named arrays
  with the labels under ``"label"``; without it, ``data.path`` is read by the built-in
  loaders (image folder, .npz, CSV/Parquet). ``config`` is the ``data`` section.
* ``fit(model, data, config, on_epoch)`` (optional) -> the trained model, when onnxflow's
  loop (Adam, cross-entropy) does not fit; ``data`` is NamedArrays, ``config`` the ``train``
  section with ``device`` resolved to ``cpu`` or ``cuda`` (the model is already there) and the
  recipe's parameters in ``config.params``, and
  ``on_epoch(epoch, {"name": value})`` sends epoch metrics to MLflow.

onnxflow exports the trained model with a softmax on top (output ``probabilities``), the
inputs named and typed as the data's, and a dynamic batch axis. The flow passes the recipe's
path between tasks, never the module; each task loads it again.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from onnxflow.errors import OnnxflowError, RecipeError

if TYPE_CHECKING:
    from onnxflow.arrays import ArrayDatasetInfo

log = logging.getLogger(__name__)

#: name -> (required, positional arguments it is called with)
FUNCTIONS = {
    "build_model": (True, "info"),
    "load_data": (False, "config"),
    "fit": (False, "model, data, config, on_epoch"),
}


@dataclass(frozen=True)
class Recipe:
    """A loaded recipe: where it came from, and its module."""

    ref: str
    module: ModuleType

    def has(self, name: str) -> bool:
        return callable(getattr(self.module, name, None))

    def call(self, name: str, *args: Any) -> Any:
        """Call one of the recipe's functions; any exception it raises becomes a RecipeError
        naming the recipe and the function (onnxflow's own errors pass through)."""
        fn = getattr(self.module, name)
        try:
            return fn(*args)
        except OnnxflowError:
            raise
        except Exception as exc:
            log.debug("%s: %s raised", self.ref, name, exc_info=True)
            raise RecipeError(
                f"{self.ref}: {name}({FUNCTIONS[name][1]}) raised "
                f"{type(exc).__name__}: {_brief(exc)}"
            ) from exc


#: The project's example recipes: the folder a stack's flow runs may use by default.
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"
#: The worker's environment variable naming the folders recipes may come from (JSON list).
RECIPE_DIRS_ENV = "ONNXFLOW_RECIPE_DIRS"


def allowed_recipe_dirs() -> list[Path]:
    """The folders a flow run's recipe may come from: the worker's ``ONNXFLOW_RECIPE_DIRS``
    (set from ``ONNXFLOW_STACK_RECIPE_DIRS`` by ``make up``), else the project's examples/."""
    import json
    import os

    listed = os.environ.get(RECIPE_DIRS_ENV)
    if listed:
        return [Path(d) for d in json.loads(listed)]
    return [EXAMPLES_DIR]


def check_recipe(ref: str, folders: list[Path]) -> str:
    """The recipe ``ref`` a flow run asks for, if the deployment allows it: an absolute
    path to a ``.py`` file that, resolved (``..`` and symlinks followed), lies inside one
    of ``folders``. Returns the resolved path (what is then imported, so a link swapped
    afterwards changes nothing); RecipeError otherwise, before any of its code runs."""
    allowed = [Path(f).resolve() for f in folders]
    where = ", ".join(map(str, allowed)) or "(none)"
    path = Path(ref)
    if not path.is_absolute() or path.suffix != ".py":
        raise RecipeError(
            f"Recipe {ref!r} refused: on the stack a recipe is an absolute path to a .py "
            f"file in an allowed folder ({where}); modules and relative paths are not run."
        )
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise RecipeError(f"Recipe {ref!r} refused: no such file on the worker.") from None
    if not resolved.is_file() or not any(resolved.is_relative_to(f) for f in allowed):
        raise RecipeError(
            f"Recipe {ref!r} refused: it resolves to {resolved}, outside the folders this "
            f"deployment allows ({where}; ONNXFLOW_STACK_RECIPE_DIRS)."
        )
    return str(resolved)


def load_recipe(ref: str | Path) -> Recipe:
    """Import the recipe at ``ref`` (a ``.py`` file, or a dotted module name) and check its
    functions; RecipeError naming the recipe and what is wrong, before anything runs."""
    text = str(ref)
    path = Path(text)
    if text.endswith(".py") or path.exists() or "/" in text:
        module = _import_file(path)
    else:
        try:
            module = importlib.import_module(text)
        except ImportError as exc:
            raise RecipeError(
                f"Recipe {text!r} is neither a file nor an importable module: {exc}"
            ) from None
        except Exception as exc:
            raise RecipeError(
                f"{text}: importing the recipe raised {type(exc).__name__}: {_brief(exc)}"
            ) from exc
    recipe = Recipe(ref=text, module=module)
    check_functions(recipe)
    return recipe


def check_functions(recipe: Recipe) -> None:
    """build_model is there; every function present takes the arguments it will be given."""
    problems = []
    for name, (required, arguments) in FUNCTIONS.items():
        fn = getattr(recipe.module, name, None)
        if fn is None:
            if required:
                problems.append(
                    f"no {name}({arguments}) function (a recipe needs "
                    "build_model(info) returning a torch.nn.Module or keras.Model)"
                )
            continue
        if not callable(fn):
            problems.append(f"{name} is a {type(fn).__name__}, not a function")
            continue
        try:
            inspect.signature(fn).bind(*arguments.split(", "))
        except TypeError:
            if name == "build_model" and takes_params(fn):
                continue
            also = " or build_model(info, params)" if name == "build_model" else ""
            problems.append(
                f"{name}{inspect.signature(fn)} cannot be called as {name}({arguments}){also}"
            )
        except ValueError:  # builtins without a signature: let the call decide
            pass
    if problems:
        raise RecipeError(f"{recipe.ref}: " + "; ".join(problems))


def takes_params(build_model) -> bool:
    """Whether ``build_model`` can be called as ``build_model(info, params)``."""
    try:
        inspect.signature(build_model).bind("info", "params")
    except (TypeError, ValueError):
        return False
    return True


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise RecipeError(f"Recipe file not found: {path}")
    resolved = path.resolve()
    name = "onnxflow_recipe_" + hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise RecipeError(f"{path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    # the recipe may import helpers that sit beside it (e.g. its data generator)
    if str(resolved.parent) not in sys.path:
        sys.path.insert(0, str(resolved.parent))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise RecipeError(
            f"{path}: importing the recipe raised {type(exc).__name__}: {_brief(exc)}"
        ) from exc
    return module


def _brief(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:600] or type(exc).__name__


def with_recipe_defaults(config):
    """``config`` with the recipe's ``DEFAULTS`` (``{"train": {"epochs": 3}, ...}``) filled
    in wherever the config did not set a value itself (YAML and command line win)."""
    if not config.recipe:
        return config
    recipe = load_recipe(config.recipe)
    defaults = getattr(recipe.module, "DEFAULTS", None) or {}
    if not isinstance(defaults, dict):
        raise RecipeError(
            f"{recipe.ref}: DEFAULTS is a {type(defaults).__name__}, expected a "
            "dict of config sections ({'train': {'epochs': 3}})"
        )
    raw = config.model_dump(by_alias=True, exclude_unset=True)
    for section, values in defaults.items():
        current = getattr(
            config, {"validate": "validate_", "register": "register_"}.get(section, section), None
        )
        if current is None or not isinstance(values, dict):
            raise RecipeError(
                f"{recipe.ref}: DEFAULTS[{section!r}] is not a config section with values"
            )
        merged = {k: v for k, v in values.items() if k not in current.model_fields_set}
        raw[section] = {**merged, **raw.get(section, {})}
        if section == "train" and isinstance(values.get("params"), dict):
            # the recipe's parameters one by one: the config's win, the others stay
            raw[section]["params"] = {**values["params"], **current.params}
    try:
        return type(config).model_validate(raw)
    except Exception as exc:  # pydantic's ValidationError names the bad key
        raise RecipeError(f"{recipe.ref}: DEFAULTS do not fit the configuration: {exc}") from None


def expected_output(info: ArrayDatasetInfo) -> str:
    """What the model must return for 2 rows, in words."""
    if info.task == "regression":
        return "predictions of shape [2, 1] (float targets: a regression)"
    return (
        f"class scores of shape [2, {info.n_classes}] "
        f"({info.n_classes} classes: {', '.join(info.class_names[:10])})"
    )
