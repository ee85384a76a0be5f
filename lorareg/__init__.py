"""lorareg — train, convert, merge, resize and catalog LoRA adapters for Stable Diffusion.

The distribution installs three packages: :mod:`loralib` (the core library: adapter model,
formats, composition, training), :mod:`lorareg.registry` (the SQLite catalog and the Hub) and
:mod:`lorareg.cli` (the ``lorareg`` command). ``python -m lorareg`` runs the command.
"""

from loralib.version import __version__

__all__ = ["__version__"]
