"""Synthetic chest-CT phantom generator (torch-free): the data every test, demo, benchmark and
the default model use, since no patient data can be had. See docs/phantom.md."""

from .errors import CharsetError, PhantomError, PlacementError
from .generator import (
    GROUND_TRUTH_FORMAT,
    PhantomOptions,
    PhantomResult,
    generate,
    make_plan,
)
from .nodules import NoduleRequest

__all__ = [
    "GROUND_TRUTH_FORMAT",
    "CharsetError",
    "NoduleRequest",
    "PhantomError",
    "PhantomOptions",
    "PhantomResult",
    "PlacementError",
    "generate",
    "make_plan",
]
