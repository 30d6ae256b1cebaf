"""A self-hosted SSH gateway for one-off dynos."""

__version__ = "0.1.0"
