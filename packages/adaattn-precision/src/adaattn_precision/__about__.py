"""Version of the adaattn-precision package."""

__version__ = "0.1.0"
