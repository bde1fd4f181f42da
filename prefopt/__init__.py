"""prefopt: train language models from preferences."""

__version__ = "0.1.0"
