"""Griffe extension for the API reference: Sphinx roles in docstrings as code.

The code's docstrings cross-reference the Sphinx way (``:class:`NamedArrays```,
``:func:`load_npz```); the Google-style parser the site uses would print the role as it
is. This shows ``NamedArrays`` instead, without changing the docstrings.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|data|mod|exc|obj|const):`~?\.?([^`]+)`")


class SphinxRolesAsCode(griffe.Extension):
    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)
