"""The throughput and latency benchmark (issue #5): ceiling, dualstream and naive, side by side.

`python -m bench` runs all three modes on the same JPEGs for a tiny
model and for the full ViT-B/16 architecture with random weights; see BENCHMARKS.md.
"""
