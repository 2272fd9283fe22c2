"""Model spec strings: every accepted form resolves to its family; anything else is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas.errors import ErrorCode, ModelSpecError
from worker.models.spec import parse_spec


@pytest.mark.parametrize(
    ("spec", "family", "source", "pretrained"),
    [
        ("align:kakaobrain/align-base", "align", "kakaobrain/align-base", None),
        ("altclip:BAAI/AltCLIP", "altclip", "BAAI/AltCLIP", None),
        ("openclip:ViT-B-16/laion2b_s34b_b88k", "openclip", "ViT-B-16", "laion2b_s34b_b88k"),
        ("openclip:laion/CLIP-ViT-B-16-laion2B-s34B-b88K", "openclip",
         "hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K", None),
        ("hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K", "openclip",
         "hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K", None),
        ("local-dir:/models/clip", "openclip", "local-dir:/models/clip", None),
        ("ViT-B-16/laion2b_s34b_b88k", "openclip", "ViT-B-16", "laion2b_s34b_b88k"),
        ("  ViT-B-32/openai ", "openclip", "ViT-B-32", "openai"),
    ],
)
def test_forms_that_need_no_lookup(spec, family, source, pretrained) -> None:
    parsed = parse_spec(spec)
    assert (parsed.family, parsed.source, parsed.pretrained) == (family, source, pretrained)


def test_family_argument_is_used_like_a_prefix() -> None:
    assert parse_spec("kakaobrain/align-base", family="align").family == "align"
    with pytest.raises(ModelSpecError, match="prefix says"):
        parse_spec("align:kakaobrain/align-base", family="altclip")


@pytest.mark.parametrize("family", ["align", "openclip", "altclip"])
def test_directories_are_recognised_by_their_config(family, tiny_model_dirs) -> None:
    directory = tiny_model_dirs[family].removeprefix("local-dir:")
    assert parse_spec(directory).family == family


@pytest.mark.parametrize("family", ["align", "openclip", "altclip"])
def test_hub_ids_are_recognised_from_the_cached_checkpoint(family, offline_hf_cache) -> None:
    real_id = offline_hf_cache[family]
    bare_id = real_id.removeprefix("hf-hub:")
    assert parse_spec(bare_id).family == family


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "   ",
        "not a model",
        "foo:bar",
        "a/b/c",
        "align:",
        "hf-hub:",
        "local-dir:",
        "altclip:not a hub id",
        "openclip:???",
    ],
)
def test_malformed_specs_list_the_accepted_forms(spec) -> None:
    with pytest.raises(ModelSpecError) as caught:
        parse_spec(spec)
    assert caught.value.code is ErrorCode.UNKNOWN_MODEL
    for form in ("align:", "openclip:", "altclip:", "hf-hub:", "local-dir:", "ViT-B-16/"):
        assert form in caught.value.message


def test_unknown_pretrained_tag_is_refused() -> None:
    with pytest.raises(ModelSpecError, match="not a pretrained tag of ViT-B-16"):
        parse_spec("ViT-B-16/no_such_tag")


def test_unknown_hub_id_offline_is_a_spec_error(offline_hf_cache) -> None:
    with pytest.raises(ModelSpecError, match=r"open_clip_config\.json") as caught:
        parse_spec("nobody/no-such-model")
    assert "Accepted forms" in caught.value.message


def test_hub_repo_of_another_model_type_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--openai--clip-vit-base-patch32"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    with pytest.raises(ModelSpecError, match="model_type 'clip'"):
        parse_spec("openai/clip-vit-base-patch32")


def test_directory_without_a_known_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelSpecError, match=r"neither config\.json"):
        parse_spec(str(tmp_path))
