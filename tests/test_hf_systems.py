"""Released LLaVA-1.5, BLIP-2 and InstructBLIP checkpoints run unchanged, and match transformers.

Each fixture builds a tiny random checkpoint from transformers' own config classes, saves it
with a tiny tokenizer and image processor (a complete folder, as on the hub; LLaVA's weights
are re-keyed to the hub's pre-transformers-5 layout), and the tests load that folder with
anymodal and compare against transformers' ``*ForConditionalGeneration`` on the same image and
prompt: token ids, pixels, logits (<= 1e-5) and greedy text.
"""

from __future__ import annotations

import logging
import re
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from anymodal.config import AnyModalConfig
from anymodal.modality import Modality
from anymodal.pipeline import AnyModalPipeline
from anymodal.processor import Message

IMAGE = Modality.IMAGE
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROMPT = "What is in the picture?"


# ---------------------------------------------------------------------------- tiny tokenizers
def _llama_tokenizer():
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(256):
        vocab[f"<0x{i:02X}>"] = len(vocab)
    for c in ["▁", *string.ascii_letters, *string.digits, *string.punctuation]:
        vocab.setdefault(c, len(vocab))
    tok = LlamaTokenizer(vocab=vocab, merges=[], add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def _opt_tokenizer():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import GPT2Tokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = GPT2Tokenizer(vocab=vocab, merges=[], bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                        unk_token="<unk>", add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def _bert_tokenizer():
    from transformers import BertTokenizer

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])}
    for c in [*string.ascii_lowercase, *string.digits, *string.punctuation]:
        vocab[c] = len(vocab)
    for c in string.ascii_lowercase:
        vocab["##" + c] = len(vocab)
    return BertTokenizer(vocab=vocab)


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random weights of unit-ish scale: transformers' init leaves query tokens at zero and logits tiny,
    which would make any comparison pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if p.ndim == 1 and "norm" in name.lower() and name.endswith("weight")
                    else 0.2 * noise)


VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=16,
              patch_size=4)
QFORMER = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
               cross_attention_frequency=2, encoder_hidden_size=16)
LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=400, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)


def _save(model, processor, path: Path) -> Path:
    model.save_pretrained(path)
    processor.save_pretrained(path)
    processor.image_processor.save_pretrained(path)  # preprocessor_config.json, as the released folders have
    return path


def _hub_layout(path: Path) -> None:
    """Re-key a LLaVA checkpoint to the layout of the released files (written before transformers 5:
    the CLIP tower nested under ``vision_model``)."""
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    sd = load_file(f)
    sd = {("vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k): v
          for k, v in sd.items()}
    save_file(sd, f, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tok = _llama_tokenizer()
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(projection_dim=8, **VISION), text_config=LlamaConfig(**LLAMA),
                      image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg)
    _perturb(model, 0)
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                             crop_size={"height": 16, "width": 16}),
                          tokenizer=tok, patch_size=4, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)
    path = _save(model, proc, tmp_path_factory.mktemp("hf") / "llava-tiny")
    _hub_layout(path)
    return path


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory) -> Path:
    from transformers import (BlipImageProcessor, Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              OPTConfig)

    tok = _opt_tokenizer()
    text = OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=300,
                     word_embed_proj_dim=16, max_position_embeddings=128, pad_token_id=1, bos_token_id=2,
                     eos_token_id=2)
    cfg = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=text.to_dict(), num_query_tokens=4,
                      image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(cfg)
    _perturb(model, 1)
    proc = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 16, "width": 16}), tokenizer=tok,
                          num_query_tokens=4)
    return _save(model, proc, tmp_path_factory.mktemp("hf") / "blip2-tiny")


@pytest.fixture(scope="module")
def instructblip_dir(tmp_path_factory) -> Path:
    from transformers import (BlipImageProcessor, InstructBlipConfig, InstructBlipForConditionalGeneration,
                              InstructBlipProcessor, LlamaConfig)

    tok, qtok = _llama_tokenizer(), _bert_tokenizer()
    cfg = InstructBlipConfig(vision_config=VISION,
                             qformer_config={**QFORMER, "vocab_size": len(qtok), "max_position_embeddings": 64},
                             text_config=LlamaConfig(**LLAMA).to_dict(), num_query_tokens=4,
                             image_token_index=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = InstructBlipForConditionalGeneration(cfg)
    _perturb(model, 2)
    proc = InstructBlipProcessor(image_processor=BlipImageProcessor(size={"height": 16, "width": 16}),
                                 tokenizer=tok, qformer_tokenizer=qtok, num_query_tokens=4)
    return _save(model, proc, tmp_path_factory.mktemp("hf") / "instructblip-tiny")


@pytest.fixture(scope="module")
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))


SYSTEMS = {  # fixture, transformers class, the prompt as the system's own processor takes it
    "llava": ("llava_dir", "LlavaForConditionalGeneration", f"USER: <image>\n{PROMPT} ASSISTANT:"),
    "blip2": ("blip2_dir", "Blip2ForConditionalGeneration", PROMPT),
    "instructblip": ("instructblip_dir", "InstructBlipForConditionalGeneration", PROMPT),
}


def _reference(request, system: str):
    import transformers

    fixture, cls_name, hf_prompt = SYSTEMS[system]
    path = request.getfixturevalue(fixture)
    model = getattr(transformers, cls_name).from_pretrained(path).eval()
    proc = transformers.AutoProcessor.from_pretrained(path)
    return path, model, proc, hf_prompt


def _anymodal_inputs(pipe, img):
    proc = pipe.processor
    text = proc.format([Message("user", proc.place_media(PROMPT, {IMAGE: 1}))])
    batch = proc([text])
    pixels = pipe.model.encoder_for(IMAGE).preprocess(IMAGE, [img])
    instruction = proc.instruction_inputs([PROMPT]) if proc.instruction_tokenizer is not None else None
    return batch, pixels, instruction


@pytest.mark.parametrize("system", list(SYSTEMS))
def test_released_checkpoint_matches_transformers(request, system, image):
    path, ref, hf_proc, hf_prompt = _reference(request, system)
    pipe = AnyModalPipeline.from_pretrained(path)
    assert pipe.generators == {}  # understanding systems: text out only
    batch, pixels, instruction = _anymodal_inputs(pipe, image)
    hf_in = hf_proc(images=image, text=hf_prompt, return_tensors="pt")

    # the same tokens (placeholders expanded, BOS where the system puts it) and the same pixels
    assert batch["input_ids"].tolist() == hf_in["input_ids"].tolist()
    assert torch.equal(pixels, hf_in["pixel_values"])
    if instruction is not None:
        assert instruction["input_ids"].tolist() == hf_in["qformer_input_ids"].tolist()

    with torch.no_grad():
        feats = pipe.model.encode_media(IMAGE, pixels, instruction)
        ours = pipe.model(batch["input_ids"], batch["attention_mask"], media={IMAGE: feats}).logits
        theirs = ref(**hf_in).logits
    assert ours.shape == theirs.shape
    assert float(theirs.abs().max()) > 0.5  # weights of real scale: the comparison can fail
    assert float((ours - theirs).abs().max()) <= 1e-5

    out = pipe(PROMPT, images=image, max_new_tokens=8)
    with torch.no_grad():
        gen = ref.generate(**hf_in, max_new_tokens=8, do_sample=False)
    expected = gen[0, hf_in["input_ids"].shape[1]:].tolist()
    eos = pipe.processor.tokenizer.eos_token_id
    if eos in expected:
        expected = expected[: expected.index(eos) + 1]
    assert len(expected) > 3 and out.token_ids[0] == expected
    assert out.text[0] == pipe.processor.tokenizer.decode(expected, skip_special_tokens=True).strip()


def test_llava_reads_576_style_patch_tokens_from_layer_minus_2(llava_dir):
    pipe = AnyModalPipeline.from_pretrained(llava_dir)
    enc = pipe.model.encoder_for(IMAGE)
    assert enc.opts.feature_layer == -2 and enc.opts.keep_cls is False
    assert enc.feature_shape(IMAGE) == (16, 16)  # (16/4)^2 patches, no CLS: 576 for 336/14
    assert pipe.config.input_projectors[IMAGE].num_tokens == 16


def test_generate_command_loads_the_folder(llava_dir, image, tmp_path, capsys):
    from anymodal.cli import main

    img = tmp_path / "in.png"
    image.save(img)
    assert main(["generate", PROMPT, "--model", str(llava_dir), "--image", str(img), "--out", str(tmp_path / "o"),
                 "--max-new-tokens", "5"]) == 0
    expected = AnyModalPipeline.from_pretrained(llava_dir)(PROMPT, images=image, max_new_tokens=5).text[0]
    assert (tmp_path / "o" / "text.txt").read_text().strip() == expected


@pytest.mark.parametrize("system", ["blip2", "instructblip"])
def test_loaded_system_saves_and_reloads(request, system, image, tmp_path):
    path = request.getfixturevalue(SYSTEMS[system][0])
    pipe = AnyModalPipeline.from_pretrained(path)
    before = pipe(PROMPT, images=image, max_new_tokens=6)
    pipe.save_pretrained(tmp_path / "saved", save_frozen=True)
    again = AnyModalPipeline.from_pretrained(tmp_path / "saved")
    assert again.processor.media_before_bos and again.processor.add_special_tokens
    assert again(PROMPT, images=image, max_new_tokens=6).token_ids == before.token_ids


# ---------------------------------------------------------------------------- strict loading
def _copy_without(src: Path, dst: Path, drop: str | None = None, add: dict | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    if drop is not None:
        assert drop in sd
        del sd[drop]
    sd.update(add or {})
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_clip_encoder_on_a_llava_folder_is_an_error_not_a_random_tower(llava_dir):
    from anymodal.encoders import ClipEncoder

    with pytest.raises(ValueError, match=r"lacks 1 of the .* weights.*visual_projection\.weight"):
        ClipEncoder.from_config({}, [IMAGE], pretrained=str(llava_dir))


def test_missing_tower_weight_is_named(llava_dir, tmp_path):
    from anymodal.encoders import HFVisionEncoder

    key = "vision_tower.vision_model.encoder.layers.1.mlp.fc2.weight"
    broken = _copy_without(llava_dir, tmp_path / "broken", drop=key)
    with pytest.raises(ValueError, match=r"lacks 1 of the .* weights .*encoder\.layers\.1\.mlp\.fc2\.weight"):
        HFVisionEncoder.from_config({"feature_layer": -2, "keep_cls": False}, [IMAGE], pretrained=str(broken))
    with pytest.raises(ValueError, match=r"encoder\.layers\.1\.mlp\.fc2\.weight"):
        AnyModalPipeline.from_pretrained(broken)


def test_a_pickled_checkpoint_folder_loads_only_when_allowed(llava_dir, tmp_path):
    """A released folder whose weights are pytorch_model.bin (pickle) is refused unless asked for."""
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(llava_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"pickle files \(pytorch_model\.bin\).*allow_pickle=True"):
        AnyModalPipeline.from_pretrained(folder)
    pipe = AnyModalPipeline.from_pretrained(folder, allow_pickle=True)
    reference = AnyModalPipeline.from_pretrained(llava_dir)
    a, b = pipe.model.state_dict(), reference.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unused_tower_weight_is_reported(llava_dir, tmp_path, caplog):
    from anymodal.encoders import HFVisionEncoder

    extra = "vision_tower.vision_model.encoder.layers.9.mlp.fc1.weight"
    folder = _copy_without(llava_dir, tmp_path / "extra", add={extra: torch.zeros(2, 2)})
    with caplog.at_level(logging.WARNING, logger="anymodal.hf_systems"):
        HFVisionEncoder.from_config({}, [IMAGE], pretrained=str(folder))
    assert extra in caplog.text


@pytest.mark.parametrize("drop, where", [
    ("qformer.layernorm.weight", "input_projectors.image"),
    ("query_tokens", "input_projectors.image"),
    ("language_projection.bias", "input_projectors.image"),
    ("language_model.model.decoder.layers.1.fc1.weight", "language model"),
])
def test_missing_projector_or_llm_weight_is_named(blip2_dir, tmp_path, drop, where):
    broken = _copy_without(blip2_dir, tmp_path / "broken", drop=drop)
    with pytest.raises(ValueError, match=rf"{where}.* lacks 1 .*: {re.escape(drop.removeprefix('language_model.'))}$"):
        AnyModalPipeline.from_pretrained(broken)


def test_qformer_geometry_comes_from_the_checkpoint(blip2_dir):
    pipe = AnyModalPipeline.from_pretrained(blip2_dir)
    q = pipe.model.input_projectors["image"].qformer
    assert q.config.cross_attention_frequency == 2 and q.config.num_hidden_layers == 2
    assert hasattr(q.encoder.layer[0], "crossattention") and not hasattr(q.encoder.layer[1], "crossattention")
    cfg = AnyModalConfig.from_dict(pipe.config.to_dict())
    assert cfg.input_projectors[IMAGE].options["config"]["cross_attention_frequency"] == 2


def test_instruction_aware_qformer_needs_the_instruction(instructblip_dir, image):
    pipe = AnyModalPipeline.from_pretrained(instructblip_dir)
    pixels = pipe.model.encoder_for(IMAGE).preprocess(IMAGE, [image])
    with pytest.raises(ValueError, match="reads the instruction"):
        pipe.model.encode_media(IMAGE, pixels)
    a = pipe.model.encode_media(IMAGE, pixels, pipe.processor.instruction_inputs(["what colour"]))
    b = pipe.model.encode_media(IMAGE, pixels, pipe.processor.instruction_inputs(["how many"]))
    assert not torch.allclose(a, b)  # the instruction changes what the queries extract


def test_hf_vision_options(llava_dir):
    from anymodal.encoders import HFVisionEncoder

    pooled = HFVisionEncoder.from_config({"output": "pooled"}, [IMAGE], pretrained=str(llava_dir))
    assert pooled.feature_shape(IMAGE) == (1, 16)
    two = HFVisionEncoder.from_config({"feature_layer": [-2, -1]}, [IMAGE], pretrained=str(llava_dir))
    assert two.feature_shape(IMAGE) == (17, 32)
    x = two.preprocess(IMAGE, [np.zeros((16, 16, 3), dtype=np.uint8)])
    assert two(IMAGE, x).shape == (1, 17, 32)
    with pytest.raises(ValueError, match="needs a CLIP tower"):
        HFVisionEncoder.from_config({"output": "projected", "config": {"model_type": "blip_2_vision_model", **VISION}},
                                    [IMAGE])
    with pytest.raises(ValueError, match="feature_layer 7 is out of range"):
        HFVisionEncoder.from_config({"feature_layer": 7}, [IMAGE], pretrained=str(llava_dir))
    siglip = {"model_type": "siglip_vision_model", **VISION}
    enc = HFVisionEncoder.from_config({"config": siglip, "feature_layer": -2}, [IMAGE])
    assert enc.feature_shape(IMAGE) == (16, 16)  # SigLIP: patches only
    assert enc(IMAGE, enc.preprocess(IMAGE, [np.zeros((16, 16, 3), dtype=np.uint8)])).shape == (1, 16, 16)
    pooled = HFVisionEncoder.from_config({"config": siglip, "output": "pooled"}, [IMAGE])
    assert pooled(IMAGE, torch.zeros(2, 3, 16, 16)).shape == (2, 1, 16)
    with pytest.raises(ValueError, match="has no CLS token"):
        HFVisionEncoder.from_config({"config": siglip, "keep_cls": False}, [IMAGE])


# ---------------------------------------------------------------------------- shipped configs
def _real_folder(tmp_path: Path, system: str) -> Path:
    """A folder with the released checkpoint's config.json (the published geometry) and no weights."""
    from transformers import (Blip2Config, CLIPVisionConfig, InstructBlipConfig, LlamaConfig, LlavaConfig,
                              OPTConfig)

    vicuna = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
    if system == "llava-1.5-7b":
        cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, image_size=336,
                                                         num_attention_heads=16, num_hidden_layers=24, patch_size=14,
                                                         projection_dim=768),
                          text_config=vicuna, image_token_index=32000, vision_feature_layer=-2,
                          vision_feature_select_strategy="default", projector_hidden_act="gelu")
    elif system == "blip2-opt-2.7b":
        opt = OPTConfig(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                        vocab_size=50272, word_embed_proj_dim=2560)
        cfg = Blip2Config(text_config=opt.to_dict(), num_query_tokens=32, image_token_index=50265)
    else:
        cfg = InstructBlipConfig(qformer_config={"vocab_size": 30523}, text_config=vicuna.to_dict(),
                                 num_query_tokens=32, image_token_index=32001)
    path = tmp_path / system
    cfg.save_pretrained(path)
    return path


@pytest.mark.parametrize("system, hub_id", [("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf"),
                                            ("blip2-opt-2.7b", "Salesforce/blip2-opt-2.7b"),
                                            ("instructblip-vicuna-7b", "Salesforce/instructblip-vicuna-7b")])
def test_shipped_config_is_what_the_checkpoint_folder_loads_as(tmp_path, system, hub_id):
    """configs/<system>.yaml, pointed at a folder, is the config anymodal detects from that folder."""
    folder = _real_folder(tmp_path, system)
    detected = __import__("anymodal.hf_systems", fromlist=["x"]).config_from_hf(folder).to_dict()
    text = (CONFIGS / f"{system}.yaml").read_text().replace(hub_id, str(folder))
    shipped = AnyModalConfig.from_dict(yaml.safe_load(text)).to_dict()
    for d in (detected, shipped):
        d.pop("name"), d["llm"].pop("dtype"), d["llm"].pop("max_new_tokens")
    assert shipped == detected


@pytest.mark.parametrize("twin", ["tiny-llava-1.5-7b", "tiny-blip2-opt-2.7b", "tiny-instructblip-vicuna-7b"])
def test_tiny_twin_builds_runs_saves_and_reloads(twin, image, tmp_path):
    real = AnyModalConfig.from_yaml(CONFIGS / f"{twin.removeprefix('tiny-')}.yaml")
    pipe = AnyModalPipeline.from_pretrained(CONFIGS / f"{twin}.yaml")
    # the twin has the layout of the real system, at a tiny size
    assert pipe.config.llm.prompt_format == real.llm.prompt_format
    for a, b in ((pipe.config.encoders["vision"], real.encoders["vision"]),):
        assert (a.type, a.options.get("feature_layer"), a.options.get("keep_cls")) == \
               (b.type, b.options.get("feature_layer"), b.options.get("keep_cls"))
    pa, pb = pipe.config.input_projectors[IMAGE], real.input_projectors[IMAGE]
    assert pa.type == pb.type and pa.options.get("instruction") == pb.options.get("instruction")
    out = pipe(PROMPT, images=image, max_new_tokens=5, seed=0)
    assert out.token_ids[0]
    pipe.save_pretrained(tmp_path / "saved")
    again = AnyModalPipeline.from_pretrained(tmp_path / "saved")
    assert again(PROMPT, images=image, max_new_tokens=5, seed=0).token_ids == out.token_ids


def test_tower_loads_from_either_key_layout(llava_dir, tmp_path):
    """Released folders nest the CLIP tower under vision_model; transformers 5 saves it without."""
    from safetensors.torch import load_file, save_file

    from anymodal.encoders import HFVisionEncoder

    flat = tmp_path / "flat"
    shutil.copytree(llava_dir, flat)
    sd = load_file(flat / "model.safetensors")
    save_file({k.replace("vision_tower.vision_model.", "vision_tower."): v for k, v in sd.items()},
              flat / "model.safetensors", metadata={"format": "pt"})
    a = HFVisionEncoder.from_config({}, [IMAGE], pretrained=str(llava_dir)).state_dict()
    b = HFVisionEncoder.from_config({}, [IMAGE], pretrained=str(flat)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qformer_from_blip2_with_a_fresh_projection(blip2_dir):
    """MiniGPT-4/5 style: BLIP-2's queries and Q-Former, a new projection to another LLM's width."""
    from safetensors import safe_open

    from anymodal.config import InputProjectorConfig
    from anymodal.hf_systems import load_projector_weights
    from anymodal.projectors import build_input_projector

    cfg = InputProjectorConfig(type="qformer", num_tokens=4, pretrained=str(blip2_dir))
    with pytest.raises(ValueError, match=r"language_projection\.weight.* shape \(16, 16\).*\(64, 16\)"):
        load_projector_weights(build_input_projector(cfg, 17, 16, 64), "qformer", str(blip2_dir), "ip")
    cfg = InputProjectorConfig(type="qformer", num_tokens=4, pretrained=str(blip2_dir),
                               options={"pretrained_projection": False})
    proj = build_input_projector(cfg, 17, 16, 64)
    load_projector_weights(proj, "qformer", str(blip2_dir), "ip")
    with safe_open(str(blip2_dir / "model.safetensors"), "pt") as f:
        assert torch.equal(proj.query_tokens, f.get_tensor("query_tokens"))
        assert torch.equal(proj.qformer.layernorm.weight, f.get_tensor("qformer.layernorm.weight"))
    assert proj(torch.randn(2, 17, 16)).shape == (2, 4, 64)


def test_instructions_batch_row_by_row(instructblip_dir, image):
    """In a batch each image's queries read its own prompt (padded), as they would alone."""
    pipe = AnyModalPipeline.from_pretrained(instructblip_dir)
    pixels = pipe.model.encoder_for(IMAGE).preprocess(IMAGE, [image, image])
    prompts = ["what colour is it", "how many?"]
    both = pipe.model.encode_media(IMAGE, pixels, pipe.processor.instruction_inputs(prompts))
    for i, p in enumerate(prompts):
        alone = pipe.model.encode_media(IMAGE, pixels[i:i + 1], pipe.processor.instruction_inputs([p]))
        assert torch.allclose(both[i:i + 1], alone, atol=1e-5)
    assert len(pipe(prompts, images=[image, image], max_new_tokens=4).text) == 2


def test_projector_options_are_checked():
    from anymodal.config import InputProjectorConfig
    from anymodal.projectors import build_input_projector

    with pytest.raises(ValueError, match="'mlp' takes no options; got colour"):
        build_input_projector(InputProjectorConfig(type="mlp", options={"colour": 1}), 1, 4, 4)
    with pytest.raises(ValueError, match="unknown field 'cross_attention_freq'"):
        build_input_projector(InputProjectorConfig(type="qformer", hidden_dim=8, num_heads=2,
                                                   options={"cross_attention_freq": 2}), 3, 4, 4)


def test_info_prints_the_config_of_a_released_folder(llava_dir, capsys):
    """`anymodal info` takes a LLaVA folder like every other model argument, and prints YAML."""
    import yaml

    from anymodal.cli import main

    assert main(["info", str(llava_dir)]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert {e["type"] for e in data["encoders"].values()} == {"hf-vision"} and "image" in data["input_projectors"]


def test_composite_checkpoint_errors_name_what_is_wrong(blip2_dir, instructblip_dir, tmp_path):
    """Issue 23, item 8: a BLIP-2 language-model tensor of the wrong shape once gave "look at the above
    report!" with the report silenced, and a missing qformer_tokenizer/ "Repo id must be in the form..."."""
    import json as _json

    from safetensors.torch import load_file, save_file

    from anymodal import AnyModalPipeline
    from anymodal.cli import main

    bad = _copy_without(blip2_dir, tmp_path / "blip2-bad")
    weights = bad / "model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if "language_model" in k and k.endswith("fc1.weight"))
    state[key] = torch.zeros(state[key].shape[0] + 3, state[key].shape[1])
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises((ValueError, RuntimeError)) as err:
        AnyModalPipeline.from_pretrained(bad)
    assert "fc1" in str(err.value) or "language_model" in str(err.value), err.value
    assert main(["generate", "hi", "--model", str(bad), "--out", str(tmp_path / "o"), "--text-only"]) == 2

    nq = _copy_without(instructblip_dir, tmp_path / "iblip-no-qtok")
    import shutil

    shutil.rmtree(nq / "qformer_tokenizer")
    with pytest.raises(FileNotFoundError, match="qformer_tokenizer does not exist .*options.tokenizer"):
        AnyModalPipeline.from_pretrained(nq)
