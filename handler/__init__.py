"""The SageMaker-style HTTP front of the engine."""
