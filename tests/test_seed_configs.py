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

from anymodal import AnyModalPipeline
from anymodal.config import AnyModalConfig
from anymodal.modality import Modality
from anymodal.registry import GENERATORS
from conftest import CONFIGS, ForceFirst, close_to_scale

SYSTEMS = ["gill", "minigpt5", "codi2"]
BLIP2_FLAN_T5_XXL = "Salesforce/blip2-flan-t5-xxl"
IMAGE, AUDIO = Modality.IMAGE, Modality.AUDIO


def load(name: str) -> AnyModalConfig:
    return AnyModalConfig.from_yaml(CONFIGS / f"{name}.yaml")


# --------------------------------------------------------------------------- the real layouts
def test_gill_layout():
    c = load("gill")
    assert c.llm.model == "facebook/opt-6.7b" and c.llm.lora is None  # frozen OPT-6.7B
    assert c.llm.signal_tokens == {IMAGE: 8}  # [IMG0]..[IMG7]
    clip = c.encoders["clip"]  # CLIPVisionModel's pooler_output (1024), what GILL's get_visual_embs maps
    assert (clip.type, clip.pretrained, clip.modalities) == ("hf-vision", "openai/clip-vit-large-patch14", [IMAGE])
    assert clip.options == {"output": "pooled"}
    assert (c.input_projectors[IMAGE].type, c.input_projectors[IMAGE].num_tokens) == ("linear", 4)
    mapper = c.output_projectors[IMAGE]  # GILLMapper: width 512, 4 heads, 4 + 4 layers, FFN 2048, 77 queries
    assert (mapper.hidden_dim, mapper.num_heads, mapper.num_layers, mapper.num_encoder_layers) == (512, 4, 4, 4)
    assert mapper.ffn_dim == 2048 and mapper.add_token_embeddings
    assert mapper.targets == {"prompt_embeds": [77, 768]}
    assert (c.generators[IMAGE].type, c.generators[IMAGE].pretrained) == \
        ("stable-diffusion", "stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_minigpt5_layout():
    c = load("minigpt5")
    assert c.llm.model == "Vision-CAIR/vicuna-7b"
    lora = c.llm.lora
    assert (lora.r, lora.alpha, lora.dropout, lora.target_modules) == (8, 16, 0.05, ["q_proj", "v_proj"])
    assert c.llm.signal_tokens == {IMAGE: 8}  # 8 generative vokens
    # MiniGPT-4's EVA ViT-g and Q-Former (32 queries) are BLIP-2 FlanT5-XXL's; a new projection to Vicuna
    vision = c.encoders["vision"]
    assert (vision.type, vision.pretrained, vision.options) == ("hf-vision", BLIP2_FLAN_T5_XXL, {})
    q = c.input_projectors[IMAGE]
    assert (q.type, q.num_tokens, q.pretrained) == ("qformer", 32, BLIP2_FLAN_T5_XXL)
    assert q.options == {"pretrained_projection": False}
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
def _signal_id(pipe: AnyModalPipeline, modality: Modality) -> int:
    return pipe.processor.signal_ids[modality][0]  # the first signal token, by whatever name the system gives it


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
        media = out.media[m][0]
        assert len(media) == 1, (m, out.text)
        outputs[m] = media
    assert outputs[IMAGE][0].size == (16, 16)

    pipe.save_pretrained(tmp_path / "saved")
    again = AnyModalPipeline.from_pretrained(tmp_path / "saved")
    assert type(again.model.language_model) is type(pipe.model.language_model)
    for m, before in outputs.items():
        after = _generate(again, m).media[m][0]
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


# --------------------------------------------------------------------------- MiniGPT-5 on BLIP-2's weights
def _blip2_folder(path: Path) -> Path:
    """A tiny random BLIP-2 checkpoint folder (weights perturbed away from transformers' init, which
    leaves the query tokens at zero)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    text = OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=300,
                     word_embed_proj_dim=16, max_position_embeddings=64)
    cfg = Blip2Config(vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=16, patch_size=4),
                      qformer_config=dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=32, cross_attention_frequency=2, encoder_hidden_size=16),
                      text_config=text.to_dict(), num_query_tokens=4)
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    return path


def _minigpt5_on(folder: Path) -> AnyModalConfig:
    """minigpt5.yaml's encoder and input projector pointed at ``folder``; the LLM, mapper and generator
    of the tiny twin."""
    import yaml

    real = yaml.safe_load((CONFIGS / "minigpt5.yaml").read_text())
    tiny = yaml.safe_load((CONFIGS / "tiny-minigpt5.yaml").read_text())
    tiny["encoders"] = {k: {**e, "pretrained": str(folder)} for k, e in real["encoders"].items()}
    tiny["input_projectors"] = {m: {**p, "pretrained": str(folder), "num_tokens": 4}
                                for m, p in real["input_projectors"].items()}
    return AnyModalConfig.from_dict(tiny)


def test_minigpt5_runs_blip2s_eva_tower_and_qformer(tmp_path):
    """MiniGPT-4/5's image side: BLIP-2's vision tower and Q-Former (cross-attention every 2nd layer,
    from the checkpoint) loaded as they are, and a fresh projection to an LLM of another width."""
    from PIL import Image
    from safetensors.torch import load_file

    folder = _blip2_folder(tmp_path / "blip2")
    ref = load_file(folder / "model.safetensors")
    torch.manual_seed(0)
    pipe = AnyModalPipeline.from_config(_minigpt5_on(folder))
    tower = pipe.model.encoder_for(IMAGE).model.state_dict()
    assert tower and all(torch.equal(v, ref[f"vision_model.{k}"]) for k, v in tower.items())
    proj = pipe.model.input_projectors["image"]
    assert torch.equal(proj.query_tokens, ref["query_tokens"])
    qformer = proj.qformer.state_dict()
    assert all(torch.equal(v, ref[f"qformer.{k}"]) for k, v in qformer.items())
    assert [hasattr(layer, "crossattention") for layer in proj.qformer.encoder.layer] == [True, False]
    hidden = pipe.model.language_model.config.hidden_size
    assert proj.proj.weight.shape == (hidden, 16) and hidden != ref["language_projection.weight"].shape[0]

    img = Image.new("RGB", (20, 20), (200, 30, 30))
    out = pipe("what is <image>?", images=[img], seed=0, max_new_tokens=4)
    pipe.save_pretrained(tmp_path / "saved")  # the geometry is recorded: the reload needs no BLIP-2 folder
    again = AnyModalPipeline.from_pretrained(tmp_path / "saved")
    assert again.config.input_projectors[IMAGE].options["config"]["cross_attention_frequency"] == 2
    assert again("what is <image>?", images=[img], seed=0, max_new_tokens=4).token_ids == out.token_ids


def test_minigpt5_geometry_is_blip2_flan_t5_xxl(tmp_path):
    """What minigpt5.yaml loads from Salesforce/blip2-flan-t5-xxl, read from a folder with that
    checkpoint's config.json geometry (transformers' BLIP-2 defaults are that checkpoint's towers):
    EVA ViT-g/14 at 224 px (257 x 1408) and a 32-query Q-Former, 768 wide, 12 layers, 12 heads,
    cross-attention every 2nd layer."""
    from transformers import Blip2Config, T5Config

    from anymodal.encoders.hf import _vision_source
    from anymodal.hf_systems import qformer_geometry

    t5 = T5Config(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, feed_forward_proj="gated-gelu")
    (tmp_path / "config.json").write_text(Blip2Config(text_config=t5.to_dict(), num_query_tokens=32).to_json_string())
    fields, queries, kind = qformer_geometry(tmp_path)
    assert (kind, queries) == ("blip-2", 32)
    assert (fields["hidden_size"], fields["num_hidden_layers"], fields["num_attention_heads"],
            fields["cross_attention_frequency"], fields["encoder_hidden_size"]) == (768, 12, 12, 2, 1408)
    vc, _ = _vision_source(tmp_path)
    assert (vc["model_type"], vc["hidden_size"], (vc["image_size"] // vc["patch_size"]) ** 2 + 1) == \
        ("blip_2_vision_model", 1408, 257)


def test_minigpt5_prompt_is_minigpt5s_format():
    """Issue 23, item 9: MiniGPT-5 used anymodal's default template. Its own (dataloader.py at 915ab17):
    the system prompt, then "###Human: <text> <Img><ImageHere></Img>" and "###Assistant:" joined by
    spaces; its vokens are [IMG0]..[IMG7]."""
    from anymodal import AnyModalConfig
    from anymodal.modality import Modality
    from anymodal.processor import Message

    config = AnyModalConfig.from_yaml(CONFIGS / "tiny-minigpt5.yaml")
    real = AnyModalConfig.from_yaml(CONFIGS / "minigpt5.yaml")
    assert config.llm.prompt == real.llm.prompt and config.llm.system_prompt == real.llm.system_prompt
    from anymodal import AnyModalPipeline

    torch.manual_seed(0)
    proc = AnyModalPipeline.from_config(config).processor
    system = ("Give the following images in <Img>ImageContent</Img> format. You will be able to see the images "
              "once I provide it to you. Please generate conversations with appropriate images.")
    text = proc.format([Message("user", proc.place_media("what happens next? <image>", {Modality.IMAGE: 1}))])
    image = "<Img>" + "<image>" * proc.media_tokens[Modality.IMAGE] + "</Img>"  # MiniGPT-5's <Img><ImageHere></Img>
    assert proc.expand(text) == f"{system} ###Human: what happens next? {image} ###Assistant:"
    assert proc.signal_strings[Modality.IMAGE] == [f"[IMG{i}]" for i in range(8)]
