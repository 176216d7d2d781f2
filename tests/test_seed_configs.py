"""The seed-system configs GILL, MiniGPT-5 and CoDi-2: each real config states the paper's layout,
and its tiny twin (configs/tiny-<name>.yaml, the same layout at toy sizes) builds, generates,
saves and reloads.

The real configs name multi-GB checkpoints and are only parsed here; what they claim is checked
against the numbers in each one's header (from the papers' released code or the paper).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor

from anymodal import AnyModalPipeline
from anymodal.config import AnyModalConfig
from anymodal.modality import Modality
from anymodal.registry import GENERATORS
from conftest import CONFIGS, close_to_scale

SYSTEMS = ["gill", "minigpt5", "codi2"]
IMAGE, AUDIO = Modality.IMAGE, Modality.AUDIO


def load(name: str) -> AnyModalConfig:
    return AnyModalConfig.from_yaml(CONFIGS / f"{name}.yaml")


# --------------------------------------------------------------------------- the real layouts
def test_gill_layout():
    c = load("gill")
    assert c.llm.model == "facebook/opt-6.7b" and c.llm.lora is None  # frozen OPT-6.7B
    assert c.llm.signal_tokens == {IMAGE: 8}  # [IMG0]..[IMG7]
    clip = c.encoders["clip"]
    assert clip.pretrained == "openai/clip-vit-large-patch14" and clip.modalities == [IMAGE]
    assert (c.input_projectors[IMAGE].type, c.input_projectors[IMAGE].num_tokens) == ("linear", 4)
    mapper = c.output_projectors[IMAGE]  # GILLMapper: width 512, 4 heads, 4 (decoder) layers, 77 queries
    assert (mapper.hidden_dim, mapper.num_heads, mapper.num_layers) == (512, 4, 4)
    assert mapper.targets == {"prompt_embeds": [77, 768]}
    assert (c.generators[IMAGE].type, c.generators[IMAGE].pretrained) == \
        ("stable-diffusion", "stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_minigpt5_layout():
    c = load("minigpt5")
    assert c.llm.model == "Vision-CAIR/vicuna-7b"
    lora = c.llm.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (8, 16, 0.05, ["q_proj", "v_proj"])
    assert c.llm.signal_tokens == {IMAGE: 8}  # 8 generative vokens
    q = c.input_projectors[IMAGE]  # MiniGPT-4's Q-Former: 32 queries, BERT-base
    assert (q.type, q.num_tokens, q.hidden_dim, q.num_layers, q.num_heads) == ("qformer", 32, 768, 12, 12)
    mapper = c.output_projectors[IMAGE]  # width 1024 (SD-2.1's text width), 4 layers, 77 queries
    assert (mapper.hidden_dim, mapper.num_layers) == (1024, 4)
    assert mapper.targets == {"prompt_embeds": [77, 1024]}
    assert (c.generators[IMAGE].type, c.generators[IMAGE].pretrained) == \
        ("stable-diffusion", "stabilityai/stable-diffusion-2-1-base")


def test_codi2_layout():
    c = load("codi2")
    assert c.llm.model == "meta-llama/Llama-2-7b-chat-hf"
    ib = c.encoders["imagebind"]
    assert ib.type == "imagebind" and ib.options == {"preset": "huge"} and set(ib.modalities) == {IMAGE, AUDIO}
    assert all(c.input_projectors[m].type == "mlp" for m in (IMAGE, AUDIO))
    # images: SD-2.1-unCLIP-h, driven by a 1024-d image embedding (ImageBind's OpenCLIP ViT-H space)
    assert (c.generators[IMAGE].type, c.generators[IMAGE].pretrained) == \
        ("stable-unclip", "stabilityai/stable-diffusion-2-1-unclip")
    assert c.output_projectors[IMAGE].targets == {"image_embeds": [1, 1024]}
    assert c.output_projectors[AUDIO].targets == {"prompt_embeds": [1, 512]}  # AudioLDM's CLAP embedding
    assert GENERATORS.get("stable-unclip").modality is IMAGE


@pytest.mark.parametrize("name", SYSTEMS)
def test_tiny_twin_has_the_real_layout(name):
    """The twin differs from the real config only in sizes and in where weights come from."""
    real, tiny = load(name), load(f"tiny-{name}")
    assert real.llm.signal_tokens == tiny.llm.signal_tokens
    assert (real.llm.lora is None) == (tiny.llm.lora is None)
    if real.llm.lora is not None:
        assert real.llm.lora.target_modules == tiny.llm.lora.target_modules
    assert {k: (e.type, e.modalities, e.options.get("output")) for k, e in real.encoders.items()} == \
        {k: (e.type, e.modalities, e.options.get("output")) for k, e in tiny.encoders.items()}
    assert {m: p.type for m, p in real.input_projectors.items()} == {m: p.type for m, p in tiny.input_projectors.items()}
    if name != "minigpt5":  # the Q-Former's query count is a size; linear/MLP token counts are layout
        assert {m: p.num_tokens for m, p in real.input_projectors.items()} == \
            {m: p.num_tokens for m, p in tiny.input_projectors.items()}
    for m, p in real.output_projectors.items():
        t = tiny.output_projectors[m]
        assert (p.type, set(p.targets), p.num_layers) == (t.type, set(t.targets), t.num_layers)
    assert {m: g.type for m, g in real.generators.items()} == {m: g.type for m, g in tiny.generators.items()}


# --------------------------------------------------------------------------- the tiny twins run
class ForceFirst(LogitsProcessor):
    """Force the first generated token (a signal token), so that a random LLM emits a medium;
    anymodal forces the rest of the block itself."""

    def __init__(self, token_id: int):
        self.token_id, self.start = token_id, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        if input_ids.shape[1] == self.start:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, self.token_id] = 0.0
        return scores


def _signal_id(pipe: AnyModalPipeline, modality: Modality) -> int:
    from anymodal.processor import signal_token_strings

    return pipe.processor.tokenizer.convert_tokens_to_ids(signal_token_strings(modality, 1)[0])


def _generate(pipe: AnyModalPipeline, modality: Modality, **media):
    # exactly one signal block: the forced first token, then the span the pipeline completes (a random LLM
    # given more tokens may start a second block)
    n = len(pipe.processor.signal_ids[modality])
    return pipe("make one", seed=0, max_new_tokens=n, logits_processor=[ForceFirst(_signal_id(pipe, modality))],
                **media)


def _arrays(items) -> list[np.ndarray]:
    return [np.asarray(x.array if hasattr(x, "array") else x, dtype=np.float32) for x in items]


@pytest.fixture(scope="module")
def pipes() -> dict[str, AnyModalPipeline]:
    return {}  # built on first use, shared by this module's tests


def _pipe(pipes: dict, name: str) -> AnyModalPipeline:
    if name not in pipes:
        torch.manual_seed(0)  # random init: the same weights whatever ran before
        pipes[name] = AnyModalPipeline.from_pretrained(CONFIGS / f"tiny-{name}.yaml")
    return pipes[name]


@pytest.mark.parametrize("name", SYSTEMS)
def test_tiny_twin_builds_generates_saves_and_reloads(pipes, name, tmp_path):
    pipe = _pipe(pipes, name)
    outputs = {}
    for m in pipe.generators:
        out = _generate(pipe, m)
        media = out.media(m)[0]
        assert len(media) == 1, (m, out.text)
        outputs[m] = media
    assert outputs[IMAGE][0].size == (16, 16)

    pipe.save_pretrained(tmp_path / "saved")
    again = AnyModalPipeline.from_pretrained(tmp_path / "saved")
    assert type(again.model.language_model) is type(pipe.model.language_model)
    for m, before in outputs.items():
        after = _generate(again, m).media(m)[0]
        for x, y in zip(_arrays(before), _arrays(after)):
            # images are uint8: allow one level of float rounding; audio within 1e-4 of its scale
            assert (np.abs(x - y).max() <= 1) if x.ndim == 3 else close_to_scale(x, y), (name, m)


def test_tiny_gill_reads_an_image(pipes):
    from PIL import Image

    pipe = _pipe(pipes, "gill")
    out = pipe("what is <image>?", images=[Image.new("RGB", (20, 20), (200, 30, 30))], seed=0, max_new_tokens=4)
    assert len(out.text) == 1 and out.images == [[]]


def test_tiny_codi2_reads_image_and_audio(pipes):
    from PIL import Image

    pipe = _pipe(pipes, "codi2")
    wave = (np.sin(np.linspace(0, 440 * 2 * np.pi, 16000)) * 0.5).astype(np.float32)
    out = _generate(pipe, IMAGE, images=[Image.new("RGB", (20, 20), (10, 200, 30))], audios=[(wave, 16000)])
    assert len(out.images[0]) == 1 and out.images[0][0].size == (16, 16)


def test_tiny_codi2_takes_unclip_settings(pipes):
    from anymodal.generators import AudioSettings, UnCLIPImageSettings

    pipe = _pipe(pipes, "codi2")
    plain = _generate(pipe, IMAGE).images[0][0]
    noisy = pipe("make one", seed=0, max_new_tokens=12, logits_processor=[ForceFirst(_signal_id(pipe, IMAGE))],
                 settings=[UnCLIPImageSettings(num_inference_steps=2, guidance_scale=10.0, noise_level=900),
                           AudioSettings(num_inference_steps=2, audio_length_s=0.064)]).images[0][0]
    assert np.abs(np.asarray(plain, dtype=np.float32) - np.asarray(noisy, dtype=np.float32)).max() > 1
    assert pipe.resolve_settings({"image": {"noise_level": 5}})[IMAGE].noise_level == 5
