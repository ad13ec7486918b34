"""Errors of the phantom generator: each message says what was wrong and what to do."""


class PhantomError(ValueError):
    """Options that cannot give a phantom."""


class CharsetError(PhantomError):
    """The patient's text cannot be written in the requested character set."""


class PlacementError(PhantomError):
    """No place in the lungs fits the requested nodules."""
