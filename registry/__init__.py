"""The local catalog of adapters (SQLite) and Hub push/pull. Uses ``loralib``, never ``cli``."""
