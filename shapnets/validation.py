"""Input checks for model authors: the same error messages every family in the zoo gives.

A model outside `shapnets` (a zoo baseline, a family of your own) validates its input with these, so that a
wrong rank, size, dtype, device or a non-finite value is an error naming the expected and the given value.
"""

from __future__ import annotations

from ._validation import check_input, check_reference, finite_output, format_shape, image_size_errors

__all__ = ["check_input", "check_reference", "finite_output", "format_shape", "image_size_errors"]
