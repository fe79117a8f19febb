"""Errors raised while locating or loading weights."""


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are not on this machine and cannot be fetched.

    The message says which file is needed, where to put it and which flag
    points to it.
    """


class CheckpointMismatchError(ValueError):
    """A prompt-learner checkpoint does not fit the model it is loaded into."""
