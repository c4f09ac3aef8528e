"""The one error type of the converter."""
from __future__ import annotations


class ConversionError(ValueError):
    """A model directory cannot be converted: a file is missing, malformed or unsupported.

    The message names the file (and tensor, where there is one) and what was expected.
    """
