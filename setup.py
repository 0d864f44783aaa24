"""The one thing pyproject.toml cannot say yet without an experimental table: the capture's
request path in C (serving/_capture.c). Built where a C compiler and Python's headers are
found; ``optional``: without them the install goes on, and capture runs the same steps in
Python (a few microseconds more per captured request; `onnxflow serve` logs which)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "onnxflow.serving._capture",
            sources=["serving/_capture.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
