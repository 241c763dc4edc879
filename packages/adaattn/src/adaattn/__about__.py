"""Version of the adaattn package."""

__version__ = "0.1.0"
