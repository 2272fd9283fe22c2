"""The tiny-model factory: each family's own format, real preprocessing, deterministic builds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker.models.tiny import REAL_IDS, build_tiny_model, install_tiny_in_hf_cache


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("family", ["align", "openclip", "altclip"])
def test_building_twice_gives_identical_files(family, tmp_path: Path) -> None:
    build_tiny_model(family, tmp_path / "one")
    build_tiny_model(family, tmp_path / "two")
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_align_processor_keeps_the_checkpoint_settings(tiny_model_dirs) -> None:
    config = json.loads((Path(tiny_model_dirs["align"]) / "processor_config.json").read_text())
    image = config.get("image_processor", config)
    assert image["include_top"] is False and image["do_normalize"] is False
    assert image["rescale_offset"] is True and image["rescale_factor"] == pytest.approx(1 / 127.5)
    assert image["size"] == {"height": 346, "width": 346}
    assert image["crop_size"] == {"height": 289, "width": 289}


def test_openclip_folder_is_open_clips_own_format(tiny_model_dirs) -> None:
    directory = Path(tiny_model_dirs["openclip"].removeprefix("local-dir:"))
    assert (directory / "open_clip_model.safetensors").is_file()
    config = json.loads((directory / "open_clip_config.json").read_text())
    assert config["model_cfg"]["text_cfg"]["vocab_size"] == 49408
    assert set(config["preprocess_cfg"]) == {"mean", "std"}


def test_hf_cache_layout_names_the_real_ids(tmp_path: Path) -> None:
    real_id = install_tiny_in_hf_cache("altclip", tmp_path)
    assert real_id == REAL_IDS["altclip"] == "BAAI/AltCLIP"
    repo = tmp_path / "models--BAAI--AltCLIP"
    revision = (repo / "refs" / "main").read_text()
    assert (repo / "snapshots" / revision / "config.json").is_file()


def test_unknown_family_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown family"):
        build_tiny_model("clip", tmp_path)
