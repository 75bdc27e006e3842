"""The error every weight source raises (torch-free: the S3 reader starts before torch loads)."""


class WeightsError(RuntimeError):
    """A model's weights could not be loaded; the message names the source and the cause."""
