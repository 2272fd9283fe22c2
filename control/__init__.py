"""The torch-free layer that producers and workers share: connections to Redis and S3, the
broker's configuration and task name, the result and dead-letter stores, and object storage.

It imports nothing from `worker/` or `producer/` (checked by the import contracts in
pyproject.toml), so a producer-only install runs it without the model libraries.
"""
