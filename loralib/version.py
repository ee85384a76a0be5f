"""lorareg's version: the one place it is written (pyproject.toml reads it from here)."""

__version__ = "0.1.0"
TOOL = f"lorareg {__version__}"  # how files and records name the program that wrote them
