"""Thin entry points: the `h2ot` command line and the Ray jobs (`python -m jobs.<name>`)."""
