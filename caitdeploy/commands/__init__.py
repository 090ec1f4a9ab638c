"""One module per CLI subcommand; each exposes one click command built on `common.py`."""
