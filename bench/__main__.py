"""`python -m bench`: see bench/__init__.py."""

from bench.cli import bench_command

bench_command()
