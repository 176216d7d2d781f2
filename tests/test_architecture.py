"""docs/architecture.md, executed: the path of one prompt and the add-a-generator example."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anymodal import AnyModalConfig, AnyModalPipeline
from anymodal.generators import DiffusersGenerator, ImageSettings, register_random_init
from anymodal.generators.random_init import build_denoiser_components
from anymodal.modality import Modality
from anymodal.registry import register_generator

from _taught import taught_pipeline
from conftest import CONFIGS, ForceFirst


@pytest.fixture(scope="module")
def saved_taught(tmp_path_factory) -> Path:
    """The taught tiny pipeline ("draw a cat" -> a caption and an image), saved."""
    path = tmp_path_factory.mktemp("taught") / "pipe"
    taught_pipeline().save_pretrained(path)
    return path


def _record(monkeypatch, calls: list[str], owner, name: str, label: str) -> None:
    import inspect

    original = inspect.getattr_static(owner, name)  # may be inherited
    is_classmethod = isinstance(original, classmethod)
    func = original.__func__ if is_classmethod else original

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        calls.append(label)
        return func(*args, **kwargs)

    monkeypatch.setattr(owner, name, classmethod(wrapper) if is_classmethod else wrapper)


def _first_occurrences(calls: list[str]) -> list[str]:
    seen: list[str] = []
    for c in calls:
        if c not in seen:
            seen.append(c)
    return seen


def test_the_path_of_one_prompt(saved_taught, tmp_path, monkeypatch):
    import anymodal.cli as cli
    import anymodal.commands as commands
    import anymodal.generation as generation
    import anymodal.pipeline as pipeline
    from anymodal.encoders.imagebind import ImageBindEncoder
    from anymodal.generators.image import StableDiffusionGenerator
    from anymodal.model import AnyModalModel
    from anymodal.processor import AnyModalProcessor

    calls: list[str] = []
    steps = [  # docs/architecture.md, "The path of one prompt", in order
        (commands, "generate_command", "1 generate_command"),
        (commands, "load_pipeline", "1 load_pipeline"),
        (pipeline.AnyModalPipeline, "from_pretrained", "1 from_pretrained"),
        (pipeline.AnyModalPipeline, "__call__", "2 __call__"),
        (pipeline, "_rows_of_media", "2 _rows_of_media"),
        (pipeline.AnyModalPipeline, "generate", "2 generate"),
        (pipeline.AnyModalPipeline, "resolve_settings", "2 resolve_settings"),
        (AnyModalProcessor, "prepare", "3 prepare"),
        (AnyModalProcessor, "place_media", "3 place_media"),
        (AnyModalProcessor, "format", "3 format"),
        (AnyModalProcessor, "__call__", "3 tokenize"),
        (ImageBindEncoder, "preprocess", "3 preprocess"),
        (AnyModalModel, "encode_media", "4 encode_media"),
        (pipeline, "generate_text", "5 generate_text"),
        (AnyModalModel, "embed", "5 embed"),
        (generation.SignalSpanForcing, "__call__", "5 SignalSpanForcing"),
        (AnyModalProcessor, "split_output", "5 split_output"),
        (AnyModalModel, "project_signal", "6 project_signal"),
        (StableDiffusionGenerator, "render", "7 render"),
        (StableDiffusionGenerator, "_run", "7 _run"),
        (commands, "write_outputs", "8 write_outputs"),
    ]
    for owner, name, label in steps:
        _record(monkeypatch, calls, owner, name, label)

    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(image)
    out = tmp_path / "out"
    assert cli.main(["generate", "draw a cat", "--model", str(saved_taught), "--out", str(out),
                     "--image", str(image), "--seed", "0", "--steps", "2"]) == 0
    order = _first_occurrences(calls)
    assert order == [label for _, _, label in steps], order
    assert (out / "image_0.png").is_file() and (out / "text.txt").is_file()


# ----------------------------------------------------------------------------- adding a generator
@register_generator("latent-consistency")
class LatentConsistencyGenerator(DiffusersGenerator):
    """A latent consistency model (Stable Diffusion distilled to a few steps), driven by prompt_embeds."""

    type_name = "latent-consistency"
    modality = Modality.IMAGE
    settings_class = ImageSettings
    required_components = ("unet", "vae", "scheduler", "tokenizer")  # the keys `components:` must give
    optional_components = ("text_encoder",)
    shape_components = ("tokenizer", "unet")  # the component configs shapes_from reads

    @classmethod
    def pipeline_class(cls):
        from diffusers import LatentConsistencyModelPipeline

        return LatentConsistencyModelPipeline

    @classmethod
    def shapes_from(cls, configs):  # per sample: what the output projector must produce
        return {"prompt_embeds": (configs["tokenizer"].model_max_length, configs["unet"].cross_attention_dim)}

    def _run(self, cond, settings, rng):  # one batched call; cond is checked against the shapes
        out = self._call_pipeline(prompt_embeds=cond["prompt_embeds"], height=settings.height, width=settings.width,
                                  num_inference_steps=settings.num_inference_steps,
                                  guidance_scale=settings.guidance_scale, generator=rng, output_type="pil")
        return list(out.images)

    def _encode(self, texts):  # optional: encode_text, the stage-2 alignment targets
        embeds, _ = self.pipeline.encode_prompt(texts, self.execution_device, 1, False)
        return {"prompt_embeds": embeds}


@register_random_init("latent-consistency")
def build_latent_consistency(specs, where):  # only for `components:` (random init)
    from diffusers import UNet2DConditionModel

    parts = build_denoiser_components(specs, where, UNet2DConditionModel)  # tokenizer, text encoder, UNet, VAE, ...
    if parts["unet"].config.time_cond_proj_dim is None:
        raise ValueError(f"{where}.unet needs time_cond_proj_dim: an LCM UNet takes the guidance scale as an input")
    return {**parts, "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


@pytest.fixture(scope="module", autouse=True)
def _unregister_latent_consistency():
    """The registries are global, and other tests enumerate their built-in types: undo the
    example's registrations once this module is done."""
    yield
    from anymodal.generators import random_init
    from anymodal.registry import GENERATORS

    GENERATORS._entries.pop("latent-consistency", None)
    random_init._BUILDERS.pop("latent-consistency", None)


def test_add_a_generator(tmp_path):
    data = AnyModalConfig.from_yaml(CONFIGS / "tiny.yaml").to_dict()
    sd = data["generators"]["image"]  # the tiny Stable Diffusion's parts
    data["generators"] = {"image": {"type": "latent-consistency",
                                    "components": {**sd["components"], "scheduler": {"class": "LCMScheduler"},
                                                   "unet": {**sd["components"]["unet"], "time_cond_proj_dim": 8}},
                                    "settings": {"num_inference_steps": 2}}}
    proj = dict(data["output_projectors"]["image"])
    proj.pop("targets")  # taken from the generator's conditioning_shapes
    data["output_projectors"] = {"image": proj}
    torch.manual_seed(0)
    pipe = AnyModalPipeline.from_config(AnyModalConfig.from_dict(data))
    gen = pipe.generators[Modality.IMAGE]
    assert isinstance(gen, LatentConsistencyGenerator)
    assert pipe.config.output_projectors[Modality.IMAGE].targets == {"prompt_embeds": [16, 32]}
    assert gen.encode_text(["a cat"])["prompt_embeds"].shape == (1, 16, 32)
    first = pipe.processor.signal_ids[Modality.IMAGE][0]
    n = len(pipe.processor.signal_ids[Modality.IMAGE])
    steps = []
    out = pipe("paint", seed=0, max_new_tokens=n, logits_processor=[ForceFirst(first)],
               on_step=lambda m, k, total: steps.append((m, k, total)))
    (image,) = out.images[0]
    assert image.size == (16, 16)
    assert steps == [(Modality.IMAGE, 1, 2), (Modality.IMAGE, 2, 2)]  # _call_pipeline reports each step

    pipe.save_pretrained(tmp_path / "saved")
    again = AnyModalPipeline.from_pretrained(tmp_path / "saved")
    assert isinstance(again.generators[Modality.IMAGE], LatentConsistencyGenerator)
    (image2,) = again("paint", seed=0, max_new_tokens=n, logits_processor=[ForceFirst(first)]).images[0]
    assert np.abs(np.asarray(image, float) - np.asarray(image2, float)).max() <= 1

    from anymodal.config import GeneratorConfig

    plain_unet = {**data["generators"]["image"]["components"], "unet": sd["components"]["unet"]}
    with pytest.raises(ValueError, match="needs time_cond_proj_dim"):
        LatentConsistencyGenerator.from_config(GeneratorConfig(type="latent-consistency", components=plain_unet))
