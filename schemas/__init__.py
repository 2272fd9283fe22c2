"""The wire contract of dualstream: jobs, results, error codes, settings and key names.

Nothing here imports torch: producers in CPU-only images depend on this package alone.
"""
