"""How far a faster configuration moves the outputs: reduced precision, channels-last, the
torch image decoder, scaled JPEG decoding, each against the exact fp32 path on one device.

    python -m bench.precision --device cuda --variants fp16,bf16,fp16+channels_last,torch_decoder

For every model (the three tiny families and the random ViT-B/16; `--models`) it encodes the
benchmark's photo-like JPEGs and a set of English and Chinese labels with the reference
configuration (fp32, Pillow decoding, default memory format) and with each variant, and
reports per variant the lowest and mean cosine between image embeddings, the lowest between
text embeddings, and the largest difference in zero-shot probabilities (softmax over the
labels). The issue's bar for half precision is cosine ≥ 0.999. Prints JSON; `--json` saves it.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import click
import torch

from bench.images import photo_like_jpegs
from bench.models import DEFAULT_CACHE, model_spec

MODELS = ("tiny-align", "tiny-openclip", "tiny-altclip", "vit-b-16")
LABELS = ["a cat", "a dog", "a red car", "a tree", "a house", "a person",
          "一只猫", "一辆红色的汽车"]
VARIANTS = ("fp16", "bf16", "channels_last", "fp16+channels_last", "torch_decoder",
            "jpeg_draft")


@dataclass(frozen=True)
class Variant:
    """What a variant changes: load options, and how an image becomes model input."""

    name: str
    load: dict[str, Any]
    image_decoder: Literal["pil", "torch"] = "pil"
    jpeg_draft: bool = False

    @classmethod
    def parse(cls, name: str) -> Variant:
        load: dict[str, Any] = {}
        decoder: Literal["pil", "torch"] = "pil"
        draft = False
        for part in name.split("+"):
            if part in ("fp16", "bf16"):
                load["dtype"] = part
            elif part == "channels_last":
                load["channels_last"] = True
            elif part == "compile":
                load["compile"] = True
            elif part == "torch_decoder":
                decoder = "torch"
            elif part == "jpeg_draft":
                draft = True
            else:
                raise click.BadParameter(f"unknown variant part {part!r} in {name!r}")
        return cls(name, load, decoder, draft)


def _spec(name: str, cache: Path, scratch: Path) -> str:
    if name == "vit-b-16":
        return model_spec(name, cache)
    from worker.models.tiny import build_tiny_model

    return build_tiny_model(name.removeprefix("tiny-"), scratch / name)


def _images_to_pixels(encoder: Any, jpegs: list[bytes], variant: Variant) -> torch.Tensor:
    """The worker's own preparation (`ImagePreparer`); with the torch decoder, the batch's
    JPEGs are decoded together on the model's device, as a GPU worker's model thread does."""
    from schemas.settings import Settings
    from worker.prepare import ImagePreparer

    settings = Settings(_env_file=None, image_decoder=variant.image_decoder,  # type: ignore[call-arg]
                        jpeg_draft=variant.jpeg_draft)
    preparer = ImagePreparer(settings, encoder, device_batches=True)
    return preparer.batch([preparer.prepare(data) for data in jpegs])


def _outputs(encoder: Any, jpegs: list[bytes], variant: Variant) -> dict[str, torch.Tensor]:
    images = encoder.encode_images(_images_to_pixels(encoder, jpegs, variant))
    texts = encoder.encode_texts(encoder.tokenize(LABELS))
    probs = encoder.logits(images, texts).softmax(dim=-1)
    return {"images": images, "texts": texts, "probs": probs}


def _compare(reference: dict[str, torch.Tensor],
             other: dict[str, torch.Tensor]) -> dict[str, float]:
    image_cos = (reference["images"] * other["images"]).sum(dim=-1)
    text_cos = (reference["texts"] * other["texts"]).sum(dim=-1)
    return {"image_cosine_min": float(image_cos.min()),
            "image_cosine_mean": float(image_cos.mean()),
            "text_cosine_min": float(text_cos.min()),
            "prob_max_abs_diff": float((reference["probs"] - other["probs"]).abs().max())}


def measure(models: list[str], variants: list[Variant], device: str, count: int,
            cache: Path, say: Callable[[str], None]) -> dict[str, Any]:
    from worker.models.loader import load_encoder

    jpegs = photo_like_jpegs(count)
    found: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for model in models:
            spec = _spec(model, cache, Path(scratch))
            reference = _outputs(load_encoder(spec, device=device), jpegs, Variant("fp32", {}))
            found[model] = {}
            for variant in variants:
                try:
                    encoder = load_encoder(spec, device=device, **variant.load)
                    found[model][variant.name] = _compare(
                        reference, _outputs(encoder, jpegs, variant))
                except (RuntimeError, NotImplementedError, ImportError) as exc:
                    found[model][variant.name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                say(f"{model} {variant.name}: {found[model][variant.name]}")
    return found


@click.command()
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N")
@click.option("--models", default=",".join(MODELS), show_default=True)
@click.option("--variants", default="bf16,channels_last,torch_decoder,jpeg_draft",
              show_default=True, help=f"comma-separated; parts joined by +: {', '.join(VARIANTS)}")
@click.option("--images", "count", type=int, default=30, show_default=True)
@click.option("--model-cache", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_CACHE, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path),
              default=None)
def main(device: str, models: str, variants: str, count: int, model_cache: Path,
         json_out: Path | None) -> None:
    """Cosine and probability drift of each variant against fp32 with Pillow decoding."""
    chosen = [m.strip() for m in models.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(MODELS))
    if unknown:
        raise click.BadParameter(f"unknown models {unknown}: choose from {', '.join(MODELS)}")
    report = {"device": device, "images": count, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
              "models": measure(chosen, [Variant.parse(v.strip()) for v in variants.split(",")
                                         if v.strip()], device, count, model_cache,
                                lambda line: print(line, file=sys.stderr, flush=True))}
    text = json.dumps(report, indent=2)
    if json_out is not None:
        json_out.write_text(text)
    click.echo(text)


if __name__ == "__main__":
    main()
