"""Version of the adaattn-linalg package."""

__version__ = "0.1.0"
