"""AI worker: turns a one-line prompt into a populated virtual world."""

__version__ = "0.1.0"
