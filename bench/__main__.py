"""`python -m bench`: the same as `dualstream bench`."""

from bench.cli import bench_command

bench_command()
