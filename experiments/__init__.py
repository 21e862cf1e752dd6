"""Experiments built on covmatch: each a package with its design, runner, report and results."""
