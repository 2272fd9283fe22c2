"""The model layer's speed options keep the embeddings: channels-last, torch.compile, fp16/bf16,
and the host→device copy. All on the CPU: the CUDA path (pinned memory, non-blocking copies)
cannot run here.

Reference: the fp32, eager, contiguous encoder of the same weights. Embeddings must agree to
cosine ≥ 0.9999 per row for layout and compilation (same dtype), ≥ 0.999 for half precision.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from PIL import Image

from schemas.jobs import ZeroShotOptions
from worker.models import vision
from worker.models.base import Encoder
from worker.models.device import host_to_device
from worker.models.loader import load_encoder
from worker.zeroshot import LabelEmbeddingCache, score

FAMILIES = ["align", "openclip", "altclip"]
TOWERS = {"align": "vision_model", "openclip": "visual", "altclip": "vision_model"}
TEXTS = ["a photo of a cat", "This is a photo of a red square.", "green stripes", "noise"]
LABELS = ["red", "green stripes", "noise", "a blue circle", "a dark room with a pink band"]
# Measured on the models below (ALIGN and AltCLIP rebuilt with text init 0.5): bf16 moves a
# probability by up to 0.042 (ALIGN), fp16 by up to 0.0085; no image's best label changes.
# On the shared tiny models bf16 moves ALIGN's by up to 0.16 (BENCHMARKS.md, bench.precision).
PROBABILITY_TOLERANCE = {"bf16": 0.05, "fp16": 0.01}


def _rowwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def _pixels(encoder: Encoder, images: list[bytes]) -> torch.Tensor:
    return torch.stack([encoder.preprocess_image(Image.open(io.BytesIO(b)).convert("RGB"))
                        for b in images])


def _probabilities(encoder: Encoder, image_embeds: torch.Tensor) -> torch.Tensor:
    options = ZeroShotOptions(labels=LABELS, top_k=len(LABELS))
    ranked = score(encoder, image_embeds, options, LabelEmbeddingCache())
    return torch.tensor([[dict((s.label, s.score) for s in row)[label] for label in LABELS]
                         for row in ranked])


def _tower(encoder: Encoder) -> torch.nn.Module:
    return getattr(encoder.model, TOWERS[encoder.family])  # type: ignore[attr-defined]


# --- host → device ------------------------------------------------------------------------


def test_host_to_device_on_cpu_returns_an_fp32_batch_uncopied() -> None:
    batch = torch.rand(2, 3, 8, 8)
    assert host_to_device(batch, torch.device("cpu"), torch.float32) is batch


def test_host_to_device_on_cpu_casts_and_changes_layout_keeping_values() -> None:
    batch = torch.rand(2, 3, 8, 8)
    moved = host_to_device(batch, torch.device("cpu"), torch.bfloat16, torch.channels_last)
    assert moved.dtype == torch.bfloat16 and moved.device.type == "cpu"
    assert moved.is_contiguous(memory_format=torch.channels_last) and not moved.is_contiguous()
    assert torch.equal(moved, batch.to(torch.bfloat16))


# --- channels-last ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_channels_last_gives_the_default_embeddings(
    family, tiny_model_dirs, tiny_encoders, sample_images
) -> None:
    encoder = load_encoder(tiny_model_dirs[family], device="cpu", channels_last=True)
    tower = _tower(encoder)
    seen: list[torch.Tensor] = []

    def record_input(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append(args[0] if args else kwargs["pixel_values"])

    tower.register_forward_pre_hook(record_input, with_kwargs=True)
    pixels = _pixels(encoder, sample_images)
    embeds = encoder.encode_images(pixels)

    convolution_weights = [p for p in tower.parameters() if p.dim() == 4]
    assert convolution_weights
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convolution_weights)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    assert not seen[0].is_contiguous()
    reference = tiny_encoders[family].encode_images(pixels)
    assert _rowwise_cosine(embeds, reference).min() >= 0.9999


# --- torch.compile ------------------------------------------------------------------------


@pytest.fixture
def graph_recorder(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[torch.fx.GraphModule]]:
    """torch.compile with a backend that records each graph and runs it eagerly.

    Dynamo still traces, guards and decides when to recompile, which is what the warm-up is
    about; only inductor's code generation (tens of seconds per graph here) is left out.
    """
    graphs: list[torch.fx.GraphModule] = []

    def record(graph: torch.fx.GraphModule, _: list[torch.Tensor]) -> Any:
        graphs.append(graph)
        return graph.forward

    monkeypatch.setattr(vision, "COMPILE_BACKEND", record)
    yield graphs
    torch._dynamo.reset()


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_tower_is_compiled_at_load_and_never_again(
    family, tiny_model_dirs, tiny_encoders, sample_images, graph_recorder
) -> None:
    encoder = load_encoder(tiny_model_dirs[family], device="cpu", compile=True)
    assert len(graph_recorder) == 2, "one graph for a batch of one, one for any other size"
    pixels = _pixels(encoder, sample_images)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for size in (len(pixels), 3, 1, 2):
            embeds = encoder.encode_images(pixels[:size])
            reference = tiny_encoders[family].encode_images(pixels[:size])
            assert _rowwise_cosine(embeds, reference).min() >= 0.9999
    assert len(graph_recorder) == 2


@pytest.mark.slow
def test_inductor_compiled_openclip_gives_the_default_embeddings(
    tiny_model_dirs, tiny_encoders, sample_images
) -> None:
    """The real compiler (inductor, CPU code generation): 20-40 s on two shared cores."""
    try:
        encoder = load_encoder(tiny_model_dirs["openclip"], device="cpu", compile=True)
        pixels = _pixels(encoder, sample_images)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for size in (len(pixels), 1):
                embeds = encoder.encode_images(pixels[:size])
                reference = tiny_encoders["openclip"].encode_images(pixels[:size])
                assert _rowwise_cosine(embeds, reference).min() >= 0.9999
    finally:
        torch._dynamo.reset()


# --- half precision -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def half_precision_model_dirs(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dirs: dict[str, str]
) -> dict[str, str]:
    """The tiny models, but ALIGN's and AltCLIP's text towers initialised at 0.5, not 1.0.

    At 1.0 attention is close to one-hot (three in four of ALIGN's attention rows put over
    99 % on one token), so bf16's 8-bit mantissa can move a row to another token: text cosine
    to fp32 falls to 0.993 (ALIGN) and 0.996 (AltCLIP), a property of that init, not of half
    precision. At 0.5 labels still stay apart (checked in the test).
    """
    from worker.models import tiny

    root = tmp_path_factory.mktemp("half-precision-models")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny, "TEXT_INIT_RANGE", 0.5)
        rebuilt = {family: tiny.build_tiny_model(family, root / family)
                   for family in ("align", "altclip")}
    return {"openclip": tiny_model_dirs["openclip"], **rebuilt}


@pytest.fixture(scope="module")
def fp32_encoders(half_precision_model_dirs: dict[str, str]) -> dict[str, Encoder]:
    return {family: load_encoder(spec, device="cpu")
            for family, spec in half_precision_model_dirs.items()}


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_embeddings_match_fp32(
    family, dtype, half_precision_model_dirs, fp32_encoders, sample_images
) -> None:
    reference = fp32_encoders[family]
    encoder = load_encoder(half_precision_model_dirs[family], device="cpu", dtype=dtype)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert encoder.dtype == half and half in {p.dtype for p in _tower(encoder).parameters()}
    pixels = _pixels(reference, sample_images)
    tokens = reference.tokenize(TEXTS)

    image_embeds, text_embeds = encoder.encode_images(pixels), encoder.encode_texts(tokens)
    assert image_embeds.dtype == text_embeds.dtype == torch.float32
    assert _rowwise_cosine(image_embeds, reference.encode_images(pixels)).min() >= 0.999
    reference_texts = reference.encode_texts(tokens)
    assert _rowwise_cosine(text_embeds, reference_texts).min() >= 0.999
    similarities = reference_texts @ reference_texts.T
    assert similarities.fill_diagonal_(0).max() < 0.9, "the texts collapsed to one point"


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_zero_shot_probabilities_stay_close(
    family, dtype, half_precision_model_dirs, fp32_encoders, sample_images
) -> None:
    reference = fp32_encoders[family]
    encoder = load_encoder(half_precision_model_dirs[family], device="cpu", dtype=dtype)
    pixels = _pixels(reference, sample_images)
    expected = _probabilities(reference, reference.encode_images(pixels))
    ours = _probabilities(encoder, encoder.encode_images(pixels))
    assert (ours - expected).abs().max() <= PROBABILITY_TOLERANCE[dtype]
    assert torch.equal(ours.argmax(dim=-1), expected.argmax(dim=-1))
