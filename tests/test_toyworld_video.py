"""The toy world's ``video-generator`` phase at smoke size: it trains, resumes bit-identically, saves a
``TextToVideoSDPipeline`` that loads through anymodal's ``text-to-video`` adapter, and refuses bad settings."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from anymodal.toyworld import loop as L
from anymodal.toyworld import train as T
from anymodal.toyworld import world
from anymodal.toyworld.recipe import VideoGeneratorPhase
from anymodal.toyworld.video_generator import evaluate_video_generator, generator_config, train_video_generator

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    T.train(out, phases=["tokenizer"], config="smoke", results_dir=None, progress=False)
    return out


def _out(tokenizer_dir: Path, out: Path) -> Path:
    shutil.copytree(tokenizer_dir / "tokenizer", out / "tokenizer")
    return out


def _run(out: Path, cfg: VideoGeneratorPhase, stop_at_step: int | None = None) -> Path:
    log = L.JsonlLog(out / "logs" / "video-generator.jsonl")
    return train_video_generator(out, cfg, log, L.RunControl(stop_at_step=stop_at_step, progress=False))


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{f.parent.name}/{k}": v for f in sorted(directory.rglob("*.safetensors")) for k, v in load_file(f).items()}


def test_trains_saves_and_generates_through_the_adapter(tokenizer_dir: Path, tmp_path: Path):
    import anymodal.generators  # noqa: F401
    from anymodal.registry import GENERATORS

    out = _out(tokenizer_dir, tmp_path / "run")
    path = _run(out, VideoGeneratorPhase.smoke())
    assert path == out / "video-generator"
    assert (out / "state" / "video-generator" / "unet.ckpt").exists()
    gen = GENERATORS.get("text-to-video").from_config(generator_config(path, steps=2))
    assert gen.conditioning_shapes == {"prompt_embeds": (16, 16)}  # (prompt_length, cross_attention_dim)
    cond = gen.encode_text(["a red circle moving left", "a blue square moving up"])
    videos = gen.render(cond, rng=torch.Generator().manual_seed(0))
    assert len(videos) == 2 and all(len(v) == world.VIDEO_FRAMES for v in videos)
    assert videos[0][0].size == (world.VIDEO_SIZE, world.VIDEO_SIZE)
    figures = evaluate_video_generator(path, 2, 0, 2, 3.0)
    assert set(figures) == {"seen", "heldout"}
    assert {"found", "colour_ok", "shape_ok", "direction_ok", "ok"} <= set(figures["seen"])


def test_resumes_bit_identically(tokenizer_dir: Path, tmp_path: Path):
    cfg = replace(VideoGeneratorPhase.smoke(), vae_steps=2, steps=4, checkpoint_every=2)
    reference = _weights(_run(_out(tokenizer_dir, tmp_path / "full"), cfg))
    for stop in (1, 3):  # inside the VAE loop (off a checkpoint boundary), inside the UNet loop
        part = _out(tokenizer_dir, tmp_path / f"stop{stop}")
        with pytest.raises(L.Stop, match="--resume"):
            _run(part, cfg, stop_at_step=stop)
        resumed = _weights(_run(part, cfg))
        assert resumed.keys() == reference.keys()
        for k, v in reference.items():
            assert torch.equal(v, resumed[k]), k


def test_reuses_the_image_generators_vae(tokenizer_dir: Path, tmp_path: Path):
    from diffusers import AutoencoderKL

    cfg = replace(VideoGeneratorPhase.smoke(), vae_from="image-generator")
    out = _out(tokenizer_dir, tmp_path / "reuse")
    with pytest.raises(ValueError, match="run the 'image-vae' phase first"):
        _run(out, cfg)
    torch.manual_seed(0)
    image_vae = AutoencoderKL(**(cfg.vae | {"sample_size": world.IMAGE_SIZE}))
    image_vae.save_pretrained(str(out / "image-vae"))
    path = _run(out, cfg)
    saved = AutoencoderKL.from_pretrained(str(path / "vae"))
    for k, v in image_vae.state_dict().items():
        assert torch.equal(v, saved.state_dict()[k]), k
    assert saved.config.scaling_factor != image_vae.config.scaling_factor  # re-measured on video frames
    assert not (out / "state" / "video-generator" / "vae.ckpt").exists()  # nothing trained


@pytest.mark.parametrize("change, message", [
    ({"vae_from": "imagegen"}, "vae_from must be one of"),
    ({"steps": 0}, "video_generator.steps must be a positive number"),
    ({"prompt_length": 40}, "prompt_length .40. exceeds"),
    ({"unet": VideoGeneratorPhase().unet | {"cross_attention_dim": 48}}, "cross_attention_dim must agree"),
    ({"caption_dropout": 1.0}, "caption_dropout must be in"),
    ({"text_aux_weight": -0.1}, "text_aux_weight must be >= 0"),
    ({"vae_from": "train", "vae": VideoGeneratorPhase().vae | {"latent_channels": 4}}, "latent_channels must agree"),
])
def test_bad_settings_raise(change: dict, message: str):
    with pytest.raises(ValueError, match=message):
        VideoGeneratorPhase(**change)


def test_missing_tokenizer_raises(tmp_path: Path):
    with pytest.raises(ValueError, match="run the 'tokenizer' phase first"):
        _run(tmp_path, VideoGeneratorPhase.smoke())
