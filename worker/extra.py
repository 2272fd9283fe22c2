"""Whether an import failed because the `[worker]` extra is not installed, and what to say."""

from __future__ import annotations

# Top-level modules that only the `[worker]` extra installs.
WORKER_EXTRA_MODULES = frozenset({
    "torch", "torchvision", "transformers", "open_clip", "safetensors", "sentencepiece",
    "numpy", "PIL", "pyarrow", "psutil",
})


def missing_worker_extra(exc: ModuleNotFoundError) -> str | None:
    """A one-line reason when `exc` is a module of the worker extra, else None."""
    if (exc.name or "").split(".")[0] not in WORKER_EXTRA_MODULES:
        return None
    return (f"dualstream: this needs the worker extra ({exc.name} is missing): "
            "pip install 'dualstream[worker]'")
