"""The wire contract of dualstream: jobs, results, error codes, settings, key names, and the
manifest and columns of the durable output shards.

Nothing here imports torch: producers in CPU-only images depend on this package alone.
"""
