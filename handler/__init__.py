"""The SageMaker-style HTTP front of the engine."""

from importlib import metadata

try:
    __version__ = metadata.version("sagemaker-llm")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0"
