"""Version of the adaattn-kernels package."""

__version__ = "0.1.0"
