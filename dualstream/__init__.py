"""dualstream: embeddings and zero-shot labels for images and texts, from a queue.

This package is the command line's root; the work lives in `producer/` (getting work in),
`worker/` (getting results out), `control/` (what both share) and `schemas/` (the contract).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dualstream")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
