"""Model spec strings → which family loads them, and from where.

A job names its model with one string. The string must say, or let us find out, which of the
three families it belongs to, because each family has its own loader and its own preprocessing.
We read the answer from the checkpoint itself (`config.json`'s `model_type`, or the presence of
`open_clip_config.json`) rather than from the name, so a renamed or private copy of a model
still loads. Hub files are fetched through `huggingface_hub`, so with `HF_HUB_OFFLINE=1` the
answer comes from the local Hugging Face cache.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from schemas.errors import ModelSpecError

Family = Literal["align", "openclip", "altclip"]
FAMILIES: tuple[Family, ...] = ("align", "openclip", "altclip")

# `model_type` in a transformers config.json → family.
HF_MODEL_TYPES: dict[str, Family] = {"align": "align", "altclip": "altclip"}

OPEN_CLIP_CONFIG = "open_clip_config.json"
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"

ACCEPTED_FORMS = (
    "a family prefix: align:<hub id or dir>, openclip:<open_clip name>, altclip:<hub id or dir>",
    "a Hugging Face hub id, e.g. kakaobrain/align-base, BAAI/AltCLIP, "
    "laion/CLIP-ViT-B-16-laion2B-s34B-b88K (family read from the checkpoint)",
    "hf-hub:<org>/<name> (open_clip)",
    "local-dir:<path> (open_clip)",
    "<open_clip architecture>/<pretrained tag>, e.g. ViT-B-16/laion2b_s34b_b88k",
    "a local directory with config.json (model_type align or altclip) or open_clip_config.json",
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec.

    `source` is what the family's own loader takes: a hub id or a directory for ALIGN and
    AltCLIP; an open_clip model name (`hf-hub:…`, `local-dir:…` or an architecture name) for
    OpenCLIP, with `pretrained` holding the tag of the `Arch/tag` form.
    """

    spec: str
    family: Family
    source: str
    pretrained: str | None = None


def spec_error(spec: str, reason: str) -> ModelSpecError:
    forms = "\n".join(f"  - {form}" for form in ACCEPTED_FORMS)
    return ModelSpecError(f"cannot load model {spec!r}: {reason}. Accepted forms:\n{forms}")


def parse_spec(spec: str, *, family: str | None = None) -> ModelSpec:
    """Parse `spec`; `family` (or a `family:` prefix) skips detection."""
    text = spec.strip()
    if not text:
        raise spec_error(spec, "the spec is empty")
    prefix, sep, rest = text.partition(":")
    if sep and prefix in FAMILIES:
        if family is not None and family != prefix:
            raise spec_error(spec, f"the prefix says {prefix!r} but family={family!r} was given")
        return _with_family(text, cast(Family, prefix), rest.strip())
    if family is not None:
        if family not in FAMILIES:
            raise spec_error(spec, f"unknown family {family!r} (known: {', '.join(FAMILIES)})")
        return _with_family(text, cast(Family, family), text)
    return _detect(text)


def _with_family(spec: str, family: Family, source: str) -> ModelSpec:
    if not source:
        raise spec_error(spec, f"nothing follows the {family!r} prefix")
    if family == "openclip":
        return _openclip(spec, source)
    if Path(source).is_dir() or _HUB_ID.match(source):
        return ModelSpec(spec, family, source)
    raise spec_error(spec, f"{source!r} is neither a directory nor a hub id")


def _openclip(spec: str, source: str) -> ModelSpec:
    if source.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
        if not source.split(":", 1)[1].strip():
            raise spec_error(spec, "nothing follows the schema prefix")
        return ModelSpec(spec, "openclip", source)
    if Path(source).is_dir():
        return ModelSpec(spec, "openclip", LOCAL_DIR_PREFIX + str(Path(source).resolve()))
    arch_tag = _arch_and_tag(spec, source)
    if arch_tag is not None:
        return ModelSpec(spec, "openclip", arch_tag[0], pretrained=arch_tag[1])
    if _HUB_ID.match(source):
        return ModelSpec(spec, "openclip", HF_HUB_PREFIX + source)
    raise spec_error(spec, f"{source!r} is not an open_clip model name")


def _detect(spec: str) -> ModelSpec:
    if spec.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
        return _openclip(spec, spec)
    if Path(spec).is_dir():
        return _from_directory(spec, Path(spec))
    arch_tag = _arch_and_tag(spec, spec)
    if arch_tag is not None:
        return ModelSpec(spec, "openclip", arch_tag[0], pretrained=arch_tag[1])
    if _HUB_ID.match(spec):
        return _from_hub(spec)
    raise spec_error(spec, "it matches none of the accepted forms")


def _arch_and_tag(spec: str, text: str) -> tuple[str, str] | None:
    """`ViT-B-16/laion2b_s34b_b88k` → (arch, tag) when arch is one of open_clip's models."""
    arch, sep, tag = text.partition("/")
    if not sep or not tag:
        return None
    import open_clip

    if arch not in open_clip.list_models():
        return None
    known = open_clip.list_pretrained_tags_by_model(arch)
    if tag not in known:
        raise spec_error(spec, f"{tag!r} is not a pretrained tag of {arch} (known: {known})")
    return arch, tag


def _from_directory(spec: str, path: Path) -> ModelSpec:
    config = _read_json(path / "config.json")
    family = HF_MODEL_TYPES.get(str(config.get("model_type"))) if config else None
    if family is not None:
        return ModelSpec(spec, family, str(path))
    if (path / OPEN_CLIP_CONFIG).is_file():
        return ModelSpec(spec, "openclip", LOCAL_DIR_PREFIX + str(path.resolve()))
    raise spec_error(
        spec, "the directory has neither config.json (align/altclip) nor open_clip_config.json"
    )


def _from_hub(repo_id: str) -> ModelSpec:
    config, why = _hub_json(repo_id, "config.json")
    family = HF_MODEL_TYPES.get(str(config.get("model_type"))) if config else None
    if family is not None:
        return ModelSpec(repo_id, family, repo_id)
    open_clip_config, _ = _hub_json(repo_id, OPEN_CLIP_CONFIG)
    if open_clip_config is not None:
        return ModelSpec(repo_id, "openclip", HF_HUB_PREFIX + repo_id)
    if config is None:
        reason = f"no config.json or {OPEN_CLIP_CONFIG} on the hub or in the local cache ({why})"
    else:
        reason = (
            f"its config.json has model_type {config.get('model_type')!r} (not align or "
            f"altclip) and it has no {OPEN_CLIP_CONFIG}"
        )
    raise spec_error(repo_id, reason)


def _hub_json(repo_id: str, filename: str) -> tuple[dict[str, Any] | None, str]:
    """One JSON file of a hub repo (from the cache when offline), or None and why not."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = hf_hub_download(repo_id, filename)
    except (EntryNotFoundError, OSError, ValueError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        return None, f"{type(exc).__name__}: {first_line}"
    return _read_json(Path(path)), ""


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
