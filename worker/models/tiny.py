"""Tiny, randomly initialised models of each family, for tests and local runs without weights.

No machine that builds or tests dualstream can download weights, so tests need models that
are small and random but otherwise real: each tiny model has its family's real tokenizer type
and the reference checkpoint's real preprocessing settings, is saved in the family's own
on-disk format (transformers `save_pretrained`; an open_clip folder with
`open_clip_config.json` and `open_clip_model.safetensors`), and is loaded back through exactly
the path a real model id takes. `install_tiny_in_hf_cache` also lays them out as a Hugging Face
cache, so with `HF_HUB_OFFLINE=1` the real ids themselves resolve to the tiny weights.

Random models have failure modes real ones do not, and a parity test would pass on them:
- EfficientNet in eval mode with fresh BatchNorm statistics maps every image to nearly the same
  point; we calibrate BatchNorm on varied images first (cumulative statistics, not momentum,
  because some of ALIGN's BatchNorm layers use PyTorch's default momentum of 0.1).
- transformers' default text init range (0.02) maps every label of a tiny ALIGN or AltCLIP
  model to nearly one embedding; their text towers here use a wider init.
- a tiny open_clip ViT pools a class token that barely sees the image (mean pairwise cosine
  0.86-0.94 across seeds); its attention value/output projections are scaled up.
Tests check that images and labels stay apart.

Tokenizers are built offline: a BERT WordPiece vocabulary written here (every letter is a
token, so nothing English is unknown), a SentencePiece unigram model trained here on a small
English and Chinese corpus (converted by transformers into XLM-R's fast tokenizer, as for the
real checkpoint), and open_clip's own CLIP BPE, which ships with the package (so the text
vocabulary stays 49408). Everything is seeded: building twice gives the same weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw

from worker.models.spec import HF_HUB_PREFIX, LOCAL_DIR_PREFIX

if TYPE_CHECKING:
    from transformers import AlignConfig, XLMRobertaTokenizer

SEED = 1234
REAL_IDS: dict[str, str] = {
    "align": "kakaobrain/align-base",
    "openclip": "laion/CLIP-ViT-B-16-laion2B-s34B-b88K",
    "altclip": "BAAI/AltCLIP",
}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_INIT_RANGE = 1.0  # 0.02 (the default) maps every label to one point

_ENGLISH = """
a an the this that is are of in on with and or my your it its one two three there here
photo photograph picture image drawing sketch painting rendering sculpture cartoon toy plastic
origami tattoo embroidered graffiti video game art doodle close up cropped bright dark bad good
nice clean dirty cool weird small large big little black white red green blue yellow orange
purple pink grey brown colour color cat dog car bird fish horse truck plane airplane boat
ship tree flower house street road city beach mountain sky sea river forest person man woman
child people face food pizza apple banana cake cup chair table book phone computer clock
tiger zebra lion elephant bear monkey snake frog deer cow sheep pig duck chicken stripe
stripes striped dots square circle pattern gradient noise checkerboard jpeg pixel low
resolution blurry jpeg corrupted hard to see rendition depiction itap of
"""
_CHINESE = """
这是一张照片 一张猫的照片 一张狗的照片 一辆红色的汽车 一只鸟在天空中飞 一条鱼在水里
蓝色的天空 绿色的树 黄色的花 白色的房子 黑色的猫 大象 老虎 斑马 狮子 飞机 轮船 城市的街道
海滩 山 河 森林 男人 女人 孩子 食物 苹果 香蕉 蛋糕 杯子 椅子 桌子 书 手机 电脑 时钟 图片 图像
"""


def build_tiny_model(family: str, out_dir: Path) -> str:
    """Build the tiny `family` model into `out_dir`; return a spec that loads it."""
    builder = _BUILDERS.get(family)
    if builder is None:
        raise ValueError(f"unknown family {family!r}: use one of {', '.join(_BUILDERS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        builder(out_dir)
    if family == "openclip":
        return LOCAL_DIR_PREFIX + str(out_dir.resolve())
    return str(out_dir.resolve())


def install_tiny_in_hf_cache(family: str, cache_dir: Path) -> str:
    """Lay the tiny model out as the Hugging Face cache entry of the family's real id.

    Returns the real id (`hf-hub:`-prefixed for open_clip), which then loads the tiny weights
    with `HF_HUB_OFFLINE=1` and `HF_HUB_CACHE=cache_dir`.
    """
    if family not in REAL_IDS:
        raise ValueError(f"unknown family {family!r}: use one of {', '.join(REAL_IDS)}")
    repo_id = REAL_IDS[family]
    org, name = repo_id.split("/")
    repo_dir = Path(cache_dir) / f"models--{org}--{name}"
    revision = hashlib.sha1(f"dualstream-tiny-{family}".encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / revision
    build_tiny_model(family, snapshot)
    if family == "openclip":
        # The real repo also carries a transformers CLIP config; spec detection must look past it.
        (snapshot / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return HF_HUB_PREFIX + repo_id if family == "openclip" else repo_id


# --- ALIGN -------------------------------------------------------------------------------


def _build_align(out_dir: Path) -> None:
    from transformers import AlignModel, AlignProcessor, BertTokenizer
    from transformers.image_utils import PILImageResampling
    from transformers.models.efficientnet import EfficientNetImageProcessor

    vocab = _bert_vocab()
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=64)
    # kakaobrain/align-base's preprocessor_config.json (not the class defaults: include_top).
    image_processor = EfficientNetImageProcessor(
        size={"height": 346, "width": 346},
        crop_size={"height": 289, "width": 289},
        do_center_crop=True,
        resample=PILImageResampling.BILINEAR,
        rescale_factor=1 / 127.5,
        rescale_offset=True,
        do_normalize=False,
        include_top=False,
    )
    model = AlignModel(_align_config(len(vocab)))
    pixels = torch.stack(
        [image_processor(images=im, return_tensors="pt")["pixel_values"][0]
         for im in _calibration_images()]
    )
    _calibrate_batchnorm(model.vision_model, pixels)
    model.save_pretrained(out_dir)
    AlignProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)


def _align_config(vocab_size: int) -> AlignConfig:
    from transformers import AlignConfig

    text = {
        "vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64,
        "initializer_range": TEXT_INIT_RANGE,
    }
    # round_filters(out_channels[-1] * width_coefficient) must equal projection_dim.
    vision = {
        "image_size": 289, "width_coefficient": 1.0, "depth_coefficient": 1.0,
        "kernel_sizes": [3, 3, 5], "in_channels": [32, 16, 24], "out_channels": [16, 24, 32],
        "strides": [1, 2, 2], "num_block_repeats": [1, 1, 1], "expand_ratios": [1, 4, 4],
        "hidden_dim": 64, "drop_connect_rate": 0.0,
    }
    return AlignConfig(
        text_config=text, vision_config=vision, projection_dim=32, temperature_init_value=0.05
    )


def _bert_vocab() -> dict[str, int]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    symbols = list("0123456789.,!?'\"-:;()[]{}/&%$#@*+=_<>")
    words = sorted(set(_english_words()) - set(letters))
    pieces = specials + symbols + letters + [f"##{c}" for c in letters + list("0123456789")]
    return {token: i for i, token in enumerate(pieces + words)}


def _calibrate_batchnorm(module: torch.nn.Module, pixels: torch.Tensor, passes: int = 2) -> None:
    """Set BatchNorm statistics from real-looking inputs (cumulative average over passes)."""
    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    module.train()
    with torch.no_grad():
        for chunk in range(passes):
            module(pixel_values=pixels[chunk::passes])
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    module.eval()


# --- OpenCLIP ----------------------------------------------------------------------------


def _build_openclip(out_dir: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32,
            "mlp_ratio": 2.0,
        },
        # The real CLIP BPE tokenizer needs the real vocabulary size.
        "text_cfg": {
            "context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2,
            "mlp_ratio": 2.0,
        },
    }
    model = open_clip.CLIP(**model_cfg)
    _widen_attention_values(model.visual, factor=3.0)
    state = {name: t.contiguous() for name, t in model.state_dict().items()}
    save_file(state, out_dir / "open_clip_model.safetensors")
    # As in laion/CLIP-ViT-B-16-laion2B-s34B-b88K's open_clip_config.json.
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)},
    }
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))


def _widen_attention_values(tower: torch.nn.Module, factor: float) -> None:
    """Scale attention's value and output projections, so more of each patch reaches the class
    token (with open_clip's default init the pooled class token barely depends on the image)."""
    attentions = [m for m in tower.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    with torch.no_grad():
        for attention in attentions:
            width = attention.embed_dim
            attention.in_proj_weight[2 * width :].mul_(factor)
            attention.out_proj.weight.mul_(factor)


# --- AltCLIP -----------------------------------------------------------------------------


def _build_altclip(out_dir: Path) -> None:
    from transformers import AltCLIPConfig, AltCLIPModel, AltCLIPProcessor, CLIPImageProcessor
    from transformers.image_utils import PILImageResampling

    tokenizer = _xlm_roberta_tokenizer()
    # BAAI/AltCLIP's preprocessor_config.json.
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        resample=PILImageResampling.BICUBIC,
        image_mean=list(OPENAI_MEAN),
        image_std=list(OPENAI_STD),
    )
    text = {
        "vocab_size": len(tokenizer), "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 80,
        "project_dim": 32, "initializer_range": TEXT_INIT_RANGE,
    }
    vision = {
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "image_size": 224, "patch_size": 32, "projection_dim": 32,
    }
    model = AltCLIPModel(AltCLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
    model.save_pretrained(out_dir)
    AltCLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)


def _xlm_roberta_tokenizer() -> XLMRobertaTokenizer:
    """Train a small SentencePiece unigram model and let transformers convert it, as for XLM-R."""
    import sentencepiece as spm
    from transformers import XLMRobertaTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentencepiece_corpus(),
        model_writer=model,
        model_type="unigram",
        vocab_size=600,
        hard_vocab_limit=False,
        character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sentencepiece.bpe.model").write_bytes(model.getvalue())
        return XLMRobertaTokenizer.from_pretrained(tmp, model_max_length=512)


def _sentencepiece_corpus() -> Iterator[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    yield from (f"{letters} {letters.upper()} 0123456789 . , ! ? ' - ( )" for _ in range(3))
    words = _english_words()
    for start in range(0, len(words), 8):
        line = " ".join(words[start:start + 8])
        yield from (line, line.capitalize())
    yield from (line.strip() for line in _CHINESE.split() for _ in range(2))


def _english_words() -> list[str]:
    import open_clip

    templates = [t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
    found = re.findall(r"[a-z]+", " ".join([_ENGLISH, *templates]).lower())
    return sorted(set(found))


# --- shared ------------------------------------------------------------------------------


def _calibration_images(count: int = 16, size: tuple[int, int] = (320, 240)) -> list[Image.Image]:
    """Varied, deterministic pictures: flat colours, gradients, stripes, shapes and noise."""
    rng = np.random.default_rng(SEED)
    images = []
    for i in range(count):
        base = rng.integers(0, 256, size=3)
        ramp = np.linspace(0, 1, size[0])[None, :, None] * rng.integers(-128, 128, size=3)
        pixels = np.clip(base + ramp + rng.normal(0, 8 * (i % 4), (size[1], size[0], 3)), 0, 255)
        image = Image.fromarray(pixels.astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(i % 5):
            box = sorted(rng.integers(0, size[0], 2)) + sorted(rng.integers(0, size[1], 2))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            draw.rectangle((box[0], box[2], box[1], box[3]), fill=colour)
        images.append(image)
    return images


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "align": _build_align,
    "openclip": _build_openclip,
    "altclip": _build_altclip,
}
