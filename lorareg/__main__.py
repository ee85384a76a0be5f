"""``python -m lorareg``: the same as the ``lorareg`` command."""

from lorareg.cli.main import main

main()
