"""The commands of `flipcheck`, one module per group; :mod:`flipcheck.cli` registers them on its app."""
