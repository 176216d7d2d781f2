"""Tests of the diffusers-backed generators, built at tiny sizes from configs/tiny.yaml.

Real diffusers and transformers classes, random init, CPU, no network.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # every load here must work without the hub

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import anymodal.generators  # noqa: F401  (registers the built-ins)
from anymodal.config import GeneratorConfig, OutputProjectorConfig
from anymodal.generators import (
    AudioSettings,
    DiffusersGenerator,
    ImageSettings,
    ModalityGenerator,
    VideoSettings,
)
from anymodal.media import Audio
from anymodal.modality import Modality
from anymodal.registry import GENERATORS
from conftest import close_to_scale

torch.set_num_threads(1)

CONFIG_PATH = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
RAW = yaml.safe_load(CONFIG_PATH.read_text())

_SCHEDULER = {"class": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
_VOCODER = RAW["generators"]["audio"]["components"]["vocoder"]

# The two generator types that tiny.yaml does not use, at the same tiny sizes.
EXTRA = {
    "audioldm2": {
        "type": "audioldm2",
        "components": {
            "unet": {"block_out_channels": [16, 32], "layers_per_block": 1, "sample_size": 32, "in_channels": 4,
                     "out_channels": 4, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                     "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
                     # per block: self-attention, then cross-attention to GPT-2 (16) and to T5 (32)
                     "cross_attention_dim": [[None, 16, 32], [None, 16, 32]], "norm_num_groups": 8},
            "vae": RAW["generators"]["audio"]["components"]["vae"],
            "text_encoder": {
                "text_config": {"hidden_size": 16, "intermediate_size": 37, "num_attention_heads": 2,
                                "num_hidden_layers": 2, "max_position_embeddings": 18, "projection_dim": 16},
                "audio_config": {"spec_size": 64, "window_size": 4, "num_mel_bins": 64, "depths": [2, 2],
                                 "num_attention_heads": [2, 2], "num_hidden_layers": 2, "hidden_size": 192,
                                 "projection_dim": 16, "patch_size": 2, "patch_stride": 2,
                                 "patch_embed_input_channels": 4},
                "projection_dim": 16,
            },
            "tokenizer": "bytes",
            "text_encoder_2": {"d_model": 32, "d_ff": 37, "d_kv": 8, "num_heads": 2, "num_layers": 2},
            "tokenizer_2": {"type": "bytes", "model_max_length": 16},
            "language_model": {"n_embd": 16, "n_head": 2, "n_layer": 2, "vocab_size": 8, "n_positions": 32,
                               "max_new_tokens": 4},
            "projection_model": {"text_encoder_dim": 16, "text_encoder_1_dim": 32, "langauge_model_dim": 16},
            "vocoder": _VOCODER,
            "scheduler": _SCHEDULER,
        },
        "settings": {"num_inference_steps": 2, "audio_length_s": 0.064},
    },
    "animatediff": {
        "type": "animatediff",
        "components": {
            "unet": {"block_out_channels": [16, 32], "layers_per_block": 1, "sample_size": 8, "in_channels": 4,
                     "out_channels": 4, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                     "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
                     "attention_head_dim": 8, "norm_num_groups": 4},
            "motion_adapter": {"block_out_channels": [16, 32], "motion_layers_per_block": 1,
                               "motion_norm_num_groups": 4, "motion_num_attention_heads": 2,
                               "motion_max_seq_length": 8},
            "vae": RAW["generators"]["video"]["components"]["vae"],
            "text_encoder": RAW["generators"]["video"]["components"]["text_encoder"],
            "tokenizer": "bytes",
            "scheduler": _SCHEDULER,
        },
        "settings": {"num_inference_steps": 2, "num_frames": 3},
    },
    "unclip": {
        "type": "stable-unclip",
        "components": {
            # the SD UNet of tiny.yaml, plus unCLIP's class embedding: [image embedding (16), noise level (16)]
            "unet": {**RAW["generators"]["image"]["components"]["unet"], "class_embed_type": "projection",
                     "projection_class_embeddings_input_dim": 32},
            "vae": RAW["generators"]["image"]["components"]["vae"],
            "text_encoder": RAW["generators"]["image"]["components"]["text_encoder"],
            "tokenizer": "bytes",
            "image_encoder": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                              "num_hidden_layers": 2, "image_size": 16, "patch_size": 8, "projection_dim": 16},
            "image_noising_scheduler": {"class": "DDPMScheduler", "num_train_timesteps": 1000,
                                        "beta_schedule": "squaredcos_cap_v2"},
            "scheduler": _SCHEDULER,
        },
        "settings": {"num_inference_steps": 2, "guidance_scale": 7.5},
    },
}

# Every tiny generator by name: the three of the YAML (keyed by modality) and the extras.
TINY: dict[str, dict] = {**RAW["generators"], **EXTRA}
NAMES = list(TINY)

EXPECTED_SHAPES = {
    "image": {"prompt_embeds": (16, 32)},
    "audio": {"prompt_embeds": (1, 32)},
    "video": {"prompt_embeds": (16, 32)},
    "audioldm2": {"prompt_embeds": (16, 32), "generated_prompt_embeds": (4, 16)},
    "animatediff": {"prompt_embeds": (16, 32)},
    "unclip": {"image_embeds": (1, 16)},
}
# Generators conditioned on something text cannot give (unCLIP's image embedding) take their
# conditioning from images: encode_images, the alignment target.
FROM_IMAGES = {"unclip"}
TEXTS = ["a red circle", "blue", "a green square!"]


def tiny_config(name: str, **overrides) -> GeneratorConfig:
    return GeneratorConfig(**{**copy.deepcopy(TINY[name]), **overrides})


@pytest.fixture(scope="module")
def gens() -> dict[str, ModalityGenerator]:
    built: dict[str, ModalityGenerator] = {}
    for name in NAMES:
        cfg = tiny_config(name)
        built[name] = GENERATORS.get(cfg.type).from_config(cfg)
    return built


def images_for(texts: list[str]) -> list[Image.Image]:
    """One deterministic picture per text (its own colour), for the image-conditioned generators."""
    return [Image.new("RGB", (20, 20), tuple((7 * len(t) + 40 * k) % 256 for k in range(3))) for t in texts]


def conditioning(gen: ModalityGenerator, texts: list[str]) -> dict[str, torch.Tensor]:
    """What the generator is driven by for these texts: its text encoding, or for unCLIP the image
    embedding of a picture standing for each text."""
    if gen.type_name == "stable-unclip":
        return gen.encode_images(images_for(texts))
    return gen.encode_text(texts)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def arrays(outputs: list) -> list[np.ndarray]:
    """Outputs of any modality as numpy arrays, for exact comparison."""
    out = []
    for item in outputs:
        if isinstance(item, Audio):
            out.append(item.array)
        elif isinstance(item, Image.Image):
            out.append(np.asarray(item))
        else:  # a video: a list of frames
            out.append(np.stack([np.asarray(f) for f in item]))
    return out


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(arrays(a), arrays(b)))


def close(a: list, b: list, rel: float = 1e-4) -> bool:
    """Every pair of outputs equal to within ``rel`` of its scale (conftest.close_to_scale)."""
    return len(a) == len(b) and all(close_to_scale(x, y, rel) for x, y in zip(arrays(a), arrays(b)))


def assert_same_weights(a, b) -> None:
    """Every torch module of two wrapped diffusers pipelines holds bit-identical tensors."""
    for name, module in a.pipeline.components.items():
        if isinstance(module, torch.nn.Module):
            sa, sb = module.state_dict(), b.pipeline.components[name].state_dict()
            assert sa.keys() == sb.keys(), name
            assert all(torch.equal(sa[k], sb[k]) for k in sa), name


# --------------------------------------------------------------------------- configs and registry
def test_yaml_is_generator_and_projector_configs():
    assert {"generators", "output_projectors"} <= set(RAW)
    assert set(RAW["generators"]) == set(RAW["output_projectors"]) == {"image", "audio", "video"}
    for modality, data in RAW["generators"].items():
        cfg = GeneratorConfig(**data)
        cls = GENERATORS.get(cfg.type)
        assert cls.modality == Modality(modality)
        OutputProjectorConfig(**RAW["output_projectors"][modality])


def test_projector_targets_match_generators(gens):
    for modality, proj in RAW["output_projectors"].items():
        targets = {k: tuple(v) for k, v in OutputProjectorConfig(**proj).targets.items()}
        assert targets == gens[modality].conditioning_shapes


def test_every_registered_generator_has_a_tiny_config():
    """Every generator anymodal registers itself; types that tests or plugins register (test_architecture's
    latent-consistency, when that file is collected too) are theirs to test."""
    own = {n for n in GENERATORS.names() if GENERATORS.get(n).__module__.startswith("anymodal.")}
    assert {"stable-diffusion", "stable-unclip", "audioldm", "audioldm2", "text-to-video", "animatediff"} <= own
    assert {TINY[n]["type"] for n in NAMES} == own


def test_generator_settings_are_checked_by_anymodal_naming_the_setting(gens):
    """diffusers' own messages ("divisible by 8", "audio_length_in_s") named arguments the user never wrote."""
    for name, side in (("image", "height"), ("video", "width"), ("animatediff", "height")):
        gen = gens[name]
        with pytest.raises(ValueError) as e:
            gen.make_settings({side: 7})
        assert str(e.value) == (f"{gen.modality.value}.{side} must be a multiple of 8 for generator "
                                f"'{gen.type_name}', got 7")
        assert getattr(gen.make_settings({side: 16}), side) == 16
    for name in ("audio", "audioldm2"):
        gen = gens[name]
        low = gen.min_audio_length_s()
        pipe = gen.pipeline  # diffusers' own bound, computed from the same configs
        assert low == pytest.approx(float(np.prod(pipe.vocoder.config.upsample_rates))
                                    / pipe.vocoder.config.sampling_rate * pipe.vae_scale_factor)
        with pytest.raises(ValueError) as e:
            gen.make_settings({"audio_length_s": low / 2})
        assert str(e.value) == (f"audio.audio_length_s must be between {low:g} and 3600 s for generator "
                                f"'{gen.type_name}', got {low / 2:g}")
        # a settings object made elsewhere is checked too, when rendering
        from anymodal.generators import AudioSettings

        cond = conditioning(gen, ["a"])
        with pytest.raises(ValueError, match="audio.audio_length_s must be between"):
            gen.render(cond, AudioSettings(num_inference_steps=1, audio_length_s=low / 2))
        out = gen.render(cond, AudioSettings(num_inference_steps=1, audio_length_s=low))
        assert len(out) == 1 and out[0].array.size > 0


def test_random_init_is_deterministic(gens):
    again = GENERATORS.get("stable-diffusion").from_config(tiny_config("image"))
    assert_same_weights(gens["image"], again)
    a = gens["image"].pipeline.unet.state_dict()
    cfg = copy.deepcopy(TINY["image"])
    cfg["components"]["seed"] = 1
    other = GENERATORS.get("stable-diffusion").from_config(GeneratorConfig(**cfg))
    assert not torch.equal(a["conv_in.weight"], other.pipeline.unet.state_dict()["conv_in.weight"])
    assert all(not m.training for m in again.pipeline.components.values() if isinstance(m, torch.nn.Module))


def test_every_registered_diffusers_generator_has_a_random_init_builder():
    from anymodal.generators.random_init import random_init_builder

    for name in GENERATORS.names():
        cls = GENERATORS.get(name)
        if issubclass(cls, DiffusersGenerator):
            assert callable(random_init_builder(cls))


def test_a_generator_without_a_builder_says_so(gens):
    from anymodal.generators import StableDiffusionGenerator

    class Unbuilt(DiffusersGenerator):  # a type only ever loaded from `pretrained`
        type_name = "unbuilt"
        settings_class = ImageSettings

    with pytest.raises(ValueError, match="'unbuilt' has no random-init builder.*give `pretrained` instead"):
        Unbuilt.from_config(GeneratorConfig(type="unbuilt", components={"unet": {}}))

    class Variant(StableDiffusionGenerator):  # a subclass builds what its base class builds
        type_name = "sd-variant"

    assert_same_weights(Variant.from_config(tiny_config("image", type="sd-variant")), gens["image"])


# --------------------------------------------------------------------------- shapes and encoding
@pytest.mark.parametrize("name", NAMES)
def test_conditioning_shapes(gens, name):
    assert gens[name].conditioning_shapes == EXPECTED_SHAPES[name]


@pytest.mark.parametrize("name", NAMES)
def test_encode_text_shapes(gens, name):
    if name in FROM_IMAGES:
        with pytest.raises(ValueError, match="use encode_images"):
            gens[name].encode_text(TEXTS[:2])
    cond = conditioning(gens[name], TEXTS[:2])
    assert set(cond) == set(EXPECTED_SHAPES[name])
    for key, (seq, dim) in EXPECTED_SHAPES[name].items():
        assert tuple(cond[key].shape) == (2, seq, dim)
        assert torch.isfinite(cond[key]).all()
        assert not cond[key].requires_grad


def test_audioldm_embeddings_are_normalised(gens):
    emb = gens["audio"].encode_text(TEXTS)["prompt_embeds"]
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3, 1))


def test_audioldm2_pads_t5_states_with_zero_rows(gens):
    gen = gens["audioldm2"]
    emb = gen.encode_text(["ab"])["prompt_embeds"][0]
    n = len(gen.pipeline.tokenizer_2("ab").input_ids)  # "▁", "a", "b", "</s>"
    assert n < 16
    assert (emb[:n] != 0).any(dim=-1).all() and (emb[n:] == 0).all()


# --------------------------------------------------------------------------- generation
def _prompt_call(gen: DiffusersGenerator, texts: list[str], settings) -> list:
    """The wrapped pipeline run on text, with the same settings, as a reference."""
    kwargs = {"num_inference_steps": settings.num_inference_steps, "guidance_scale": settings.guidance_scale,
              "generator": seeded(0)}
    if gen.type_name == "stable-unclip":  # the pipeline encodes the images itself, with prompt ""
        return gen.pipeline(image=images_for(texts), output_type="pil", **kwargs).images
    if isinstance(settings, AudioSettings):
        out = gen.pipeline(texts, audio_length_in_s=settings.audio_length_s, output_type="np", **kwargs)
        return [Audio(a, gen.sample_rate) for a in out.audios]
    if isinstance(settings, VideoSettings):
        return gen.pipeline(texts, num_frames=settings.num_frames, output_type="pil", **kwargs).frames
    return gen.pipeline(texts, output_type="pil", **kwargs).images


@pytest.mark.parametrize("name", NAMES)
def test_render_matches_the_pipelines_own_text_path(gens, name):
    # encode_text -> render must equal the pipeline's prompt path: same embeddings, same
    # unconditional embedding for guidance, same squeeze/padding conventions.
    gen = gens[name]
    ours = gen.render(conditioning(gen, TEXTS[:2]), rng=seeded(0))
    ref = _prompt_call(gen, TEXTS[:2], gen.make_settings())
    for x, y in zip(arrays(ours), arrays(ref)):
        assert np.abs(x.astype(np.float32) - y.astype(np.float32)).max() <= (1e-4 if x.dtype == np.float32 else 1)


def test_image_outputs(gens):
    gen = gens["image"]
    images = gen.render(gen.encode_text(TEXTS), rng=seeded(0))
    assert len(images) == 3 and all(isinstance(im, Image.Image) and im.size == (16, 16) for im in images)
    wide = gen.render(gen.encode_text(TEXTS[:1]), settings={"height": 24, "width": 32}, rng=seeded(0))
    assert wide[0].size == (32, 24)
    typed = gen.render(gen.encode_text(TEXTS[:1]), settings=ImageSettings(num_inference_steps=1, guidance_scale=1.0))
    assert typed[0].size == (16, 16)


@pytest.mark.parametrize("name", ["audio", "audioldm2"])
def test_audio_outputs(gens, name):
    gen = gens[name]
    audios = gen.render(gen.encode_text(TEXTS), rng=seeded(0))
    assert len(audios) == 3
    for audio in audios:
        assert isinstance(audio, Audio) and audio.sample_rate == 16000
        assert audio.array.dtype == np.float32 and audio.array.ndim == 1
        assert audio.duration == pytest.approx(0.064, abs=1e-3)
    short = gen.render(gen.encode_text(TEXTS[:1]), settings={"audio_length_s": 0.032})
    assert short[0].duration == pytest.approx(0.032, abs=1e-3)


@pytest.mark.parametrize("name", ["video", "animatediff"])
def test_video_outputs(gens, name):
    gen = gens[name]
    frames_default = TINY[name]["settings"]["num_frames"]
    videos = gen.render(gen.encode_text(TEXTS), rng=seeded(0))
    assert len(videos) == 3
    for video in videos:
        assert len(video) == frames_default
        assert all(isinstance(f, Image.Image) and f.size == (16, 16) for f in video)
    two = gen.render(gen.encode_text(TEXTS[:1]), settings=VideoSettings(num_inference_steps=1, num_frames=2))
    assert len(two[0]) == 2


@pytest.mark.parametrize("name", NAMES)
def test_batch_is_one_pipeline_call(gens, name, monkeypatch):
    gen = gens[name]
    cond = conditioning(gen, TEXTS)
    pipe_cls = type(gen.pipeline)
    original = pipe_cls.__call__
    calls = []

    def counting(self, *args, **kwargs):
        calls.append(kwargs["prompt_embeds"].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pipe_cls, "__call__", counting)
    assert len(gen.render(cond, rng=seeded(0))) == 3
    assert calls == [3]


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_output(gens, name):
    gen = gens[name]
    cond = conditioning(gen, TEXTS[:2])
    first = gen.render(cond, rng=seeded(7))
    assert same(first, gen.render(cond, rng=seeded(7)))
    assert not same(first, gen.render(cond, rng=seeded(8)))
    # one generator per row is passed through to the pipeline (a batch of one differs from a row
    # of a batch of two only by float rounding)
    if name in FROM_IMAGES:
        # unCLIP draws the embedding noise before the latents, from the same generator, so only
        # one generator per row (what AnyModalPipeline passes) makes a row independent of its batch
        first = gen.render(cond, rng=[seeded(7), seeded(9)])
    alone = gen.render({k: v[:1] for k, v in cond.items()}, rng=[seeded(7)])
    np.testing.assert_allclose(arrays(alone)[0].astype(np.float32), arrays(first)[0].astype(np.float32),
                               rtol=1e-4, atol=1e-5 if isinstance(alone[0], Audio) else 1)


def test_settings_are_resolved_once_on_each_path(gens, monkeypatch):
    gen = gens["image"]
    calls = []
    original = gen.make_settings
    monkeypatch.setattr(gen, "make_settings", lambda settings=None: calls.append(settings) or original(settings))
    cond = gen.encode_text(TEXTS[:1])
    overrides = {"num_inference_steps": 1, "height": 16, "width": 24}
    [image] = gen.render(cond, settings=overrides)  # a dict: merged with the config's defaults here
    assert calls == [overrides] and image.size == (24, 16)
    resolved = original({**overrides, "width": 32})
    [image] = gen.render(cond, settings=resolved)  # already resolved: used as it is
    assert calls == [overrides] and image.size == (32, 16)


def test_progress_flag_controls_diffusers_progress_bar(gens, capsys):
    gen = gens["image"]
    cond = gen.encode_text(TEXTS[:1])
    gen.render(cond)
    assert gen.pipeline._progress_bar_config == {"disable": True}
    assert "it/s" not in capsys.readouterr().err
    gen.render(cond, progress=True)
    assert gen.pipeline._progress_bar_config == {"disable": False}


@pytest.mark.parametrize("name", NAMES)
def test_on_step_reports_every_denoising_step_and_stops_the_call_when_it_raises(gens, name):
    """Every built-in generator reports steps 1..N of N, whichever callback its diffusers pipeline
    takes (``callback_on_step_end`` or the older ``callback``), and an exception from ``on_step``
    stops the pipeline at that step; the next call runs whole again."""
    gen = gens[name]
    cond = conditioning(gen, TEXTS[:1])
    steps = []
    first = gen.render(cond, settings={"num_inference_steps": 3}, rng=seeded(0),
                       on_step=lambda k, n: steps.append((k, n)))
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert same(first, gen.render(cond, settings={"num_inference_steps": 3}, rng=seeded(0)))  # no effect on output

    class Stop(Exception):
        pass

    seen = []

    def stop_at_two(k, n):
        seen.append(k)
        if k == 2:
            raise Stop

    with pytest.raises(Stop):
        gen.render(cond, settings={"num_inference_steps": 3}, on_step=stop_at_two)
    assert seen == [1, 2]
    assert same(first, gen.render(cond, settings={"num_inference_steps": 3}, rng=seeded(0)))


def test_projected_conditioning_is_accepted(gens):
    # What an output projector produces: any float tensor of the right shape, with grad, any dtype.
    gen = gens["image"]
    cond = {"prompt_embeds": torch.randn(2, 16, 32, dtype=torch.float64, requires_grad=True)}
    assert len(gen.render(cond, rng=seeded(0))) == 2


def test_pipeline_without_text_encoder(gens):
    cfg = copy.deepcopy(TINY["image"])
    del cfg["components"]["text_encoder"]
    cfg["components"]["tokenizer"] = {"type": "bytes", "model_max_length": 16}  # it fixes the prompt length
    gen = GENERATORS.get("stable-diffusion").from_config(GeneratorConfig(**cfg))
    assert gen.conditioning_shapes == {"prompt_embeds": (16, 32)}  # from the tokenizer and UNet
    with pytest.raises(ValueError, match="no text encoder"):
        gen.encode_text(["x"])
    # guidance uses zeros as the unconditional embedding
    images = gen.render({"prompt_embeds": torch.randn(2, 16, 32)}, rng=seeded(0))
    assert len(images) == 2


# --------------------------------------------------------------------------- save / load / lazy
def _weight_files(directory: Path) -> list[str]:
    suffixes = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack"}
    return sorted(p.suffix for p in directory.rglob("*") if p.suffix in suffixes)


@pytest.mark.parametrize("name", NAMES)
def test_save_and_reload_round_trip(gens, name, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    gen = gens[name]
    cond = conditioning(gen, TEXTS[:2])
    before = gen.render(cond, rng=seeded(3))
    gen.save_pretrained(tmp_path / "saved")
    weights = _weight_files(tmp_path / "saved")
    assert weights and set(weights) == {".safetensors"}

    cfg = GeneratorConfig(type=TINY[name]["type"], pretrained=str(tmp_path / "saved"),
                          settings=TINY[name]["settings"])
    lazy = GENERATORS.get(cfg.type).from_config(GeneratorConfig(**{**vars(cfg), "lazy": True}))
    assert lazy.conditioning_shapes == gen.conditioning_shapes and not lazy.is_loaded
    again = GENERATORS.get(cfg.type).from_config(cfg)
    assert again.is_loaded and again.conditioning_shapes == gen.conditioning_shapes
    assert_same_weights(gen, again)
    assert close(before, again.render(cond, rng=seeded(3)))  # exact on some CPUs, not on every one
    for key, value in conditioning(again, TEXTS[:2]).items():
        torch.testing.assert_close(value, cond[key], rtol=0, atol=0)


def test_lazy_loading(gens, tmp_path):
    gens["image"].save_pretrained(tmp_path / "sd")
    cfg = GeneratorConfig(type="stable-diffusion", pretrained=str(tmp_path / "sd"), lazy=True,
                          settings=TINY["image"]["settings"])
    gen = GENERATORS.get("stable-diffusion").from_config(cfg)
    assert not gen.is_loaded
    # shapes are read from the saved configs, so checking projectors does not load weights
    assert gen.conditioning_shapes == {"prompt_embeds": (16, 32)}
    assert not gen.is_loaded
    assert gen.to("cpu") is gen and not gen.is_loaded
    images = gen.render({"prompt_embeds": torch.randn(1, 16, 32)})
    assert gen.is_loaded and len(images) == 1
    pipe = gen.pipeline
    gen.render({"prompt_embeds": torch.randn(1, 16, 32)})
    assert gen.pipeline is pipe  # resident: never reloaded per call


def test_lazy_load_of_a_missing_directory_fails_on_use(tmp_path):
    cfg = GeneratorConfig(type="stable-diffusion", pretrained=str(tmp_path / "nothing"), lazy=True)
    gen = GENERATORS.get("stable-diffusion").from_config(cfg)
    with pytest.raises(Exception):
        gen.render({"prompt_embeds": torch.randn(1, 16, 32)})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only warning")
def test_cpu_offload_without_cuda_warns():
    with pytest.warns(UserWarning, match="CUDA is not available"):
        gen = GENERATORS.get("stable-diffusion").from_config(tiny_config("image", cpu_offload=True))
    assert len(gen.render({"prompt_embeds": torch.randn(1, 16, 32)})) == 1


def test_to_returns_self(gens):
    assert gens["video"].to("cpu") is gens["video"]
    assert gens["video"].pipeline.device.type == "cpu"


# --------------------------------------------------------------------------- bad inputs
def test_wrong_conditioning_shape_names_expected_and_got(gens):
    gen = gens["image"]
    with pytest.raises(ValueError, match=r"\(batch, 16, 32\), got \(2, 16, 31\)"):
        gen.render({"prompt_embeds": torch.randn(2, 16, 31)})
    with pytest.raises(ValueError, match=r"\(batch, 16, 32\), got \(16, 32\)"):
        gen.render({"prompt_embeds": torch.randn(16, 32)})
    with pytest.raises(ValueError, match=r"\(batch, 1, 32\), got \(2, 32\)"):
        gens["audio"].render({"prompt_embeds": torch.randn(2, 32)})


def test_bad_conditioning_keys_and_types(gens):
    with pytest.raises(ValueError, match="missing 'prompt_embeds'"):
        gens["image"].render({"embeds": torch.randn(1, 16, 32)})
    with pytest.raises(ValueError, match="unknown key 'extra'"):
        gens["image"].render({"prompt_embeds": torch.randn(1, 16, 32), "extra": torch.randn(1, 16, 32)})
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        gens["image"].render({"prompt_embeds": np.zeros((1, 16, 32))})
    with pytest.raises(ValueError, match="missing 'generated_prompt_embeds'"):
        gens["audioldm2"].render({"prompt_embeds": torch.randn(1, 16, 32)})
    with pytest.raises(ValueError, match="batch size"):
        gens["audioldm2"].render({"prompt_embeds": torch.randn(2, 16, 32),
                                  "generated_prompt_embeds": torch.randn(3, 4, 16)})
    with pytest.raises(ValueError, match="list of strings"):
        gens["image"].encode_text("a single string")


def test_bad_settings(gens):
    cond = {"prompt_embeds": torch.randn(1, 16, 32)}
    with pytest.raises(ValueError, match="allowed fields: num_inference_steps"):
        gens["image"].render(cond, settings={"num_inference_step": 2})
    with pytest.raises(ValueError, match="num_inference_steps must be a positive integer"):
        gens["image"].render(cond, settings={"num_inference_steps": -1})
    with pytest.raises(ValueError, match="audio_length_s must be a positive finite number"):
        gens["audio"].render({"prompt_embeds": torch.randn(1, 1, 32)}, settings={"audio_length_s": -1.0})
    with pytest.raises(TypeError, match="must be ImageSettings or a dict"):
        gens["image"].render(cond, settings=AudioSettings())
    with pytest.raises(ValueError, match="unknown field|allowed fields"):  # bad defaults fail at load
        GENERATORS.get("stable-diffusion").from_config(tiny_config("image", settings={"steps": 2}))


@pytest.mark.parametrize("cls,field,value,match", [
    (ImageSettings, "num_inference_steps", 1.5, "positive integer"),  # was a numpy TypeError deep in diffusers
    (ImageSettings, "guidance_scale", float("nan"), "finite number >= 0"),
    (ImageSettings, "guidance_scale", float("inf"), "finite number >= 0"),  # was an all-black image
    (ImageSettings, "height", 64.0, "positive integer"),
    (AudioSettings, "audio_length_s", float("inf"), "positive finite number"),
    (AudioSettings, "guidance_scale", float("-inf"), "finite number >= 0"),
    (VideoSettings, "num_frames", 10**7, "at most"),
    (VideoSettings, "fps", float("nan"), "positive integer"),
])
def test_settings_refuse_non_finite_and_fractional_values(cls, field, value, match):
    with pytest.raises(ValueError, match=f"{field} must be .*{match}|{match}"):
        cls(**{field: value})


def _broken(name: str, edit) -> GeneratorConfig:
    data = copy.deepcopy(TINY[name])
    edit(data["components"])
    return GeneratorConfig(**data)


@pytest.mark.parametrize("name, edit, message", [
    ("image", lambda c: c.update(safety_checker={}), r"unknown key 'safety_checker'; allowed: scheduler, seed, "
                                                    r"text_encoder, tokenizer, unet, vae"),
    ("image", lambda c: c.pop("vae"), r"missing required key 'vae'"),
    ("image", lambda c: c["scheduler"].update({"class": "NoSuchScheduler"}), r"unknown scheduler 'NoSuchScheduler'"),
    ("image", lambda c: c["scheduler"].pop("class"), r"needs a 'class' key"),
    ("image", lambda c: c["text_encoder"].update(hidden_sise=32), r"text_encoder: unknown key 'hidden_sise'"),
    ("image", lambda c: c["unet"].update(block_out_channel=[4]), r"unet: unknown key 'block_out_channel'"),
    ("image", lambda c: c["text_encoder"].update(hidden_size=48), r"text_encoder.hidden_size=48, "
                                                                  r"unet.cross_attention_dim=32"),
    ("image", lambda c: c["text_encoder"].update(vocab_size=100), r"vocab_size \(100\) is smaller"),
    ("image", lambda c: c.update(tokenizer={"type": "bytes", "model_max_length": 32}),
     r"max_position_embeddings \(16\) is smaller than the tokenizer's model_max_length \(32\)"),
    ("image", lambda c: c.update(tokenizer="/no/such/tokenizer"), r"is not a directory"),
    ("image", lambda c: c.update(seed="zero"), r"seed must be an integer"),
    ("audio", lambda c: c["unet"].update(class_embed_type=None), r"class_embed_type must be 'simple_projection'"),
    ("audio", lambda c: c.update(tokenizer={"type": "bytes", "model_max_length": 17}), r"model_max_length \+ 2"),
    ("audioldm2", lambda c: c["language_model"].pop("max_new_tokens"), r"needs 'max_new_tokens'"),
    ("audioldm2", lambda c: c["text_encoder"].update(text_cfg={}), r"unknown key 'text_cfg'"),
    ("animatediff", lambda c: c.pop("motion_adapter"), r"missing required key 'motion_adapter'"),
])
def test_bad_components(name, edit, message):
    cfg = _broken(name, edit)
    with pytest.raises(ValueError, match=message):
        GENERATORS.get(cfg.type).from_config(cfg)


def test_config_type_must_match_class():
    with pytest.raises(ValueError, match="builds generator type 'audioldm'"):
        GENERATORS.get("audioldm").from_config(tiny_config("image"))
    with pytest.raises(ValueError, match="exactly one of"):
        GeneratorConfig(type="stable-diffusion", pretrained="x", components={})


# --------------------------------------------------------------------------- unCLIP (image embeddings in)
def test_unclip_image_outputs_and_settings(gens):
    from anymodal.generators import UnCLIPImageSettings

    gen = gens["unclip"]
    cond = gen.encode_images(images_for(TEXTS))
    images = gen.render(cond, rng=seeded(0))
    assert len(images) == 3 and all(isinstance(im, Image.Image) and im.size == (16, 16) for im in images)
    # a plain ImageSettings is accepted and keeps the configured noise level
    s = gen.make_settings(ImageSettings(num_inference_steps=1, guidance_scale=1.0))
    assert isinstance(s, UnCLIPImageSettings) and s.noise_level == 0 and s.num_inference_steps == 1
    # noise on the embedding changes the output; the same seed still reproduces it
    noisy = gen.render(cond, settings={"noise_level": 500}, rng=seeded(0))
    assert not same(images, noisy)
    assert same(noisy, gen.render(cond, settings={"noise_level": 500}, rng=seeded(0)))
    with pytest.raises(ValueError, match="noise_level must be below the image noising scheduler's 1000 steps"):
        gen.render(cond, settings={"noise_level": 1000})
    with pytest.raises(ValueError, match="noise_level must be an integer >= 0"):
        gen.render(cond, settings={"noise_level": -1})


def test_unclip_projected_embeddings_and_errors(gens):
    gen = gens["unclip"]
    # what an output projector produces: any float tensor of shape (batch, 1, D)
    assert len(gen.render({"image_embeds": torch.randn(2, 1, 16, requires_grad=True)}, rng=seeded(0))) == 2
    with pytest.raises(ValueError, match=r"missing 'image_embeds'"):
        gen.render({"prompt_embeds": torch.randn(1, 16, 32)})
    with pytest.raises(ValueError, match=r"\(batch, 1, 16\), got \(2, 16\)"):
        gen.render({"image_embeds": torch.randn(2, 16)})
    with pytest.raises(ValueError, match="non-empty list of PIL images"):
        gen.encode_images(images_for(["x"])[0])


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["unet"].update(class_embed_type=None), r"class_embed_type must be 'projection'"),
    (lambda c: c["unet"].update(projection_class_embeddings_input_dim=24),
     r"unet.projection_class_embeddings_input_dim=24, 2 x image_encoder.projection_dim=32"),
    (lambda c: c.pop("image_encoder"), r"missing required key 'image_encoder'"),
    (lambda c: c["image_encoder"].update(projection_dims=8), r"image_encoder: unknown key 'projection_dims'"),
    (lambda c: c["image_noising_scheduler"].update({"class": "Nope"}), r"image_noising_scheduler.class: unknown"),
])
def test_unclip_bad_components(edit, message):
    cfg = _broken("unclip", edit)
    with pytest.raises(ValueError, match=message):
        GENERATORS.get("stable-unclip").from_config(cfg)
