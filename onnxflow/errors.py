"""The onnxflow error hierarchy: one base, one subclass per stage.

Deterministic failures (bad data, a model that fails validation) are raised as these
and are never retried; only transient registry or network I/O is retried.
"""

from __future__ import annotations


class OnnxflowError(Exception):
    """Base class for every error onnxflow raises on purpose."""


class ConfigError(OnnxflowError):
    """The configuration (YAML file and command-line options) cannot be used."""


class DataError(OnnxflowError):
    """The input table cannot be used: missing file, unknown column, bad values..."""


class RecipeError(OnnxflowError):
    """A recipe (the user's model code) cannot be used: a missing or failing function, a
    wrong return type, a model that does not fit the data or cannot be exported. The
    message names the recipe file and the function."""


class TrainingError(OnnxflowError):
    """Training failed or produced an unusable model."""


class ExportError(OnnxflowError):
    """The framework model could not be exported to ONNX."""


class SimplifyError(OnnxflowError):
    """Raised only for unusable inputs; a failed simplification is recorded, not raised."""


class ValidationError(OnnxflowError):
    """One or more validation checks failed; the report names each of them."""

    def __init__(self, failures: list[str], report_path: str | None = None) -> None:
        self.failures = list(failures)
        self.report_path = report_path
        lines = "\n".join(f"  ✗ {f}" for f in self.failures)
        where = f"\nReport: {report_path}" if report_path else ""
        super().__init__(f"{len(self.failures)} validation check(s) failed:\n{lines}{where}")


class RegistryError(OnnxflowError):
    """The MLflow registry refused or could not complete an operation."""


class PromotionError(OnnxflowError):
    """An alias could not be moved (unknown model, version or metric)."""


class ServingError(OnnxflowError):
    """The endpoint could not load, verify or serve a model."""


class UnsafeModelError(OnnxflowError):
    """The model refers to external data outside its own folder."""


class StackError(OnnxflowError):
    """A server of the stack could not start, become healthy or be reached."""


class ModelImportError(OnnxflowError):
    """A model file or its sample cannot be imported: unknown or broken file, a sample that
    does not fit the model's inputs."""


class QuantizationError(OnnxflowError):
    """Quantization failed or lost more accuracy than allowed; nothing is registered."""


class ConversionError(OnnxflowError):
    """An ONNX model could not be converted back into a framework, or lost parity."""


class SweepError(OnnxflowError):
    """A sweep could not produce a model: no trial completed, or its settings do not fit."""


def answered_error(response, field: str = "error") -> str:
    """What an HTTP error answer says: its JSON body's ``field`` (onnxflow endpoints say
    ``error``, MLflow says ``message``), else its text."""
    try:
        return str(response.json().get(field, response.text))
    except (ValueError, AttributeError):  # not JSON, or JSON but not an object
        return response.text
