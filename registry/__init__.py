"""The local catalog of adapters (SQLite) and Hub push/pull. Uses ``loralib``, never ``cli``.

- :mod:`registry.catalog`: :class:`~registry.catalog.Catalog` — add, look up, list, search, tag,
  remove, and record what commands wrote (``register_output``).
- :mod:`registry.scan`: index folders in place, incrementally and resumably.
- :mod:`registry.lineage`: the tree of operations behind an adapter.
- :mod:`registry.verify`: re-hash recorded files; find missing, moved and changed ones.
- :mod:`registry.resolve`: a path, catalog name, hash prefix or Hub id -> a local path.
- :mod:`registry.hub` and :mod:`registry.model_card`: push with a model card, pull verified.
- :mod:`registry.schema`, :mod:`registry.home`: the database file, its tables and migrations.

Nothing here imports torch, diffusers or peft unless a Hub push has to convert formats.
"""
