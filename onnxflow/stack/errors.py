"""The stack's error: one subclass of the project's base error."""

from __future__ import annotations

from onnxflow.errors import OnnxflowError


class StackError(OnnxflowError):
    """A server of the stack could not start, become healthy or be reached."""
