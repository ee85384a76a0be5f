"""The local catalog of adapters (SQLite) and Hub push/pull. Uses ``loralib``, never ``cli``.

- :mod:`lorareg.registry.catalog`: :class:`~lorareg.registry.catalog.Catalog` — add, look up, list, search, tag,
  remove, and record what commands wrote (``register_output``).
- :mod:`lorareg.registry.outputs`: record what an operation wrote (``record_output``), for the CLI and the playground.
- :mod:`lorareg.registry.scan`: index folders in place, incrementally and resumably.
- :mod:`lorareg.registry.lineage`: the tree of operations behind an adapter.
- :mod:`lorareg.registry.verify`: re-hash recorded files; find missing, moved and changed ones.
- :mod:`lorareg.registry.resolve`: a path, catalog name, hash prefix or Hub id -> a local path.
- :mod:`lorareg.registry.hub` and :mod:`lorareg.registry.model_card`: push with a model card, pull verified.
- :mod:`lorareg.registry.schema`, :mod:`lorareg.registry.home`: the database file, its tables and migrations.

Nothing here imports torch, diffusers or peft unless a Hub push has to convert formats.
"""
