"""The ``lorareg`` command line: thin click + rich commands over ``loralib`` and ``registry``."""
