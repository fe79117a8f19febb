"""Errors raised while locating or loading weights."""

from crane.errors import CraneError



class WeightsNotFoundError(CraneError, FileNotFoundError):
    """Pretrained weights are not on this machine and cannot be fetched.

    The message says which file is needed, where to put it and which flag
    points to it.
    """


class CheckpointMismatchError(CraneError):
    """A prompt-learner checkpoint does not fit the model it is loaded into."""


class ModelSettingsError(CraneError):
    """The model settings do not fit the weights (such as layers beyond the vision tower's depth)."""
