"""NExT-GPT parity: anymodal against numbers made by NExT-GPT's own code (60d618b).

tests/fixtures/make_reference_nextgpt.py built NExT-GPT's TextFcLayer and llama_proj and a tiny
Vicuna with NExT-GPT's LoRA and added tokens, and wrote a tiny checkpoint in the released key
format with reference inputs and outputs. These tests need only the fixtures.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor

from anymodal.cli import main as cli_main
from anymodal.config import AnyModalConfig, GeneratorConfig, OutputProjectorConfig
from anymodal.convert.nextgpt import (OUTPUT_KEYS, OUTPUT_PREFIXES, ConversionError, convert_nextgpt, load_delta,
                                      output_projector_config, plan_delta)
from anymodal.modality import Modality
from anymodal.pipeline import AnyModalPipeline
from anymodal.projectors import build_output_projector
from anymodal.registry import GENERATORS
from anymodal.tokenization import byte_level_tokenizer

FIX = Path(__file__).resolve().parent / "fixtures" / "nextgpt"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REF = dict(np.load(FIX / "reference.npz"))
META = json.loads((FIX / "reference.json").read_text())


def close(a, b, rel: float) -> float:
    """Largest difference relative to ``b``'s largest magnitude; asserts it is within ``rel``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float(np.abs(a - b).max()) / max(float(np.abs(b).max()), 1e-30)
    assert err <= rel, err
    return err


@pytest.fixture(scope="module")
def delta() -> dict[str, torch.Tensor]:
    return load_delta(FIX / "pytorch_model.pt")


# ---------------------------------------------------------------- modules
@pytest.mark.parametrize("m", [Modality.IMAGE, Modality.VIDEO, Modality.AUDIO], ids=lambda m: m.value)
def test_output_projector_matches_textfclayer(delta, m: Modality):
    plan = plan_delta(delta)
    cfg = OutputProjectorConfig(**output_projector_config(delta, OUTPUT_PREFIXES[m], META["output_heads"]))
    proj = build_output_projector(cfg, META["hidden"]).eval()
    state = {dst: (delta[src][0] if dst.startswith("queries.") else delta[src]).float()
             for src, dst in plan.output[m].items()}
    proj.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = proj(torch.from_numpy(REF[f"{m.value}_hidden"]), torch.from_numpy(REF[f"{m.value}_token_embeds"]))
    close(out["prompt_embeds"].numpy(), REF[f"{m.value}_out"], 1e-5)
    # without the token-embedding term the output is another one: the term is really used
    with torch.no_grad():
        other = proj(torch.from_numpy(REF[f"{m.value}_hidden"]), torch.zeros_like(torch.from_numpy(REF[f"{m.value}_token_embeds"])))
    assert not np.allclose(other["prompt_embeds"].numpy(), REF[f"{m.value}_out"], atol=1e-3)


def test_input_projector_matches_llama_proj(delta):
    lin = torch.nn.Linear(delta["llama_proj.weight"].shape[1], delta["llama_proj.weight"].shape[0])
    from anymodal.config import InputProjectorConfig
    from anymodal.projectors import build_input_projector

    proj = build_input_projector(InputProjectorConfig(type="linear", num_tokens=1), 1, lin.in_features, lin.out_features)
    proj.load_state_dict({"proj.weight": delta["llama_proj.weight"].float(), "proj.bias": delta["llama_proj.bias"].float()})
    with torch.no_grad():
        out = proj(torch.from_numpy(REF["proj_features"])[:, None, :])[:, 0]
    close(out.numpy(), REF["proj_out"], 1e-5)


def test_full_size_textfclayer_maps_onto_the_shipped_config():
    """All 129 tensors of NExT-GPT's full-size TextFcLayer land on anymodal's projector built from
    configs/nextgpt-7b.yaml, with the same shapes, heads, pre-norm and activation."""
    full = META["textfclayer_full_size"]
    cfg = AnyModalConfig.from_yaml(CONFIGS / "nextgpt-7b.yaml")
    pcfg = cfg.output_projectors[Modality.IMAGE]
    with torch.device("meta"):
        ours = build_output_projector(pcfg, 4096)
    mapped = {}
    for key, shape in full["keys"].items():
        target = next(p.sub(t, key) for p, t in OUTPUT_KEYS if p.fullmatch(key))
        mapped[target] = shape[1:] if target.startswith("queries.") else shape
    assert len(full["keys"]) == 129
    assert mapped == {k: list(v.shape) for k, v in ours.state_dict().items()}
    assert pcfg.num_heads == full["nhead"] == 4
    layer = ours.encoders["prompt_embeds"].layers[0]
    assert layer.norm_first == full["norm_first"] and layer.self_attn.batch_first == full["batch_first"]
    assert layer.activation.__name__ == full["activation"] and layer.dropout.p == full["dropout"]
    assert ours.decoders["prompt_embeds"].norm is not None and ours.encoders["prompt_embeds"].norm is not None


def test_checkpoint_fixture_is_in_the_released_key_format(delta):
    keys = set(delta)
    assert "llama_model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in keys
    assert {"llama_proj.weight", "llama_proj.bias", "gen_text_hidden_fcs.0.query_embs",
            "gen_text_hidden_fcs_video.0.tfm.encoder.norm.weight", "gen_text_hidden_fcs_audio.0.model.weight"} <= keys
    assert delta["llama_model.base_model.model.model.embed_tokens.weight"].shape[0] == META["base_vocab"] + 38


# ---------------------------------------------------------------- end to end
def _vicuna(tmp: Path, extra_tokens: int = 0) -> Path:
    d = tmp / "vicuna"
    shutil.copytree(FIX / "vicuna-tiny", d)
    tok = byte_level_tokenizer()
    if extra_tokens:
        tok.add_tokens([f"<x{i}>" for i in range(extra_tokens)])
    tok.save_pretrained(d)
    return d


def _generators(tmp: Path) -> dict[str, str]:
    """Tiny SD / AudioLDM / text-to-video (tiny.yaml's) whose conditioning shapes fit the fixture."""
    tiny = AnyModalConfig.from_yaml(CONFIGS / "tiny.yaml")
    out = {}
    for m, g in tiny.generators.items():
        d = tmp / f"gen-{m.value}"
        GENERATORS.get(g.type).from_config(GeneratorConfig(type=g.type, components=g.components)).save_pretrained(d)
        out[m.value] = str(d)
    return out


def _imagebind(tmp: Path) -> Path:
    from safetensors.torch import save_file

    from anymodal.encoders.imagebind import ImageBindEncoder

    enc = ImageBindEncoder.from_config({"preset": "tiny"}, ["image", "audio", "video"])
    path = tmp / "imagebind_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(path))
    return path


class _ForceFirst(LogitsProcessor):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == 0:  # the first generated token (generation from embeddings)
            forced = torch.full_like(scores, torch.finfo(scores.dtype).min)
            forced[:, self.token] = 0.0
            return forced
        return scores


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("nextgpt")
    gens = _generators(tmp)
    out = tmp / "nextgpt-tiny"
    rc = cli_main(["convert", "nextgpt", str(FIX / "pytorch_model.pt"), "--llm", str(_vicuna(tmp)), "--out", str(out),
                   "--imagebind", str(_imagebind(tmp)), "--imagebind-preset", "tiny", "--dtype", "float32",
                   "--image-generator", gens["image"], "--audio-generator", gens["audio"],
                   "--video-generator", gens["video"], "--no-progress"])
    assert rc == 0
    return out


def test_converted_directory_is_safetensors_only(converted: Path):
    files = [p for p in converted.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pt", ".pth", ".bin", ".pkl")]
    assert (converted / "llm_adapter" / "adapter_model.safetensors").is_file()
    cfg = AnyModalConfig.from_yaml(converted / "config.yaml")
    assert cfg.llm.lora.r == META["lora_r"] and cfg.llm.embedding_rows == "all"
    assert cfg.output_projectors[Modality.AUDIO].targets == {"prompt_embeds": [1, 32]}


def test_end_to_end_matches_nextgpt(converted: Path):
    pipe = AnyModalPipeline.from_pretrained(converted)
    proc = pipe.processor
    ids = META["token_ids"]
    assert proc.signal_ids[Modality.IMAGE] == [ids[f"[IMG{i}]"] for i in range(4)]
    assert proc.signal_ids[Modality.VIDEO] == [ids[f"[VID{i}]"] for i in range(24)]
    assert proc.signal_ids[Modality.AUDIO] == [ids[f"[AUD{i}]"] for i in range(8)]
    # one llama_proj for every modality
    assert pipe.model.input_projectors["image"] is pipe.model.input_projectors["audio"] is pipe.model.input_projectors["video"]

    # the prompt's token layout is NExT-GPT's: BOS per text segment, <Img> feature </Img>
    text = proc.format([__import__("anymodal.processor", fromlist=["Message"]).Message(
        "user", proc.place_media(META["e2e_prompt"], {Modality.IMAGE: 1}))])
    want = REF["e2e_prompt_ids"][0].tolist()
    want = [proc.placeholder_ids[Modality.IMAGE] if t == -1 else t for t in want]
    assert proc([text])["input_ids"][0].tolist() == want

    feature = torch.from_numpy(REF["e2e_feature"]).reshape(1, 1, -1)
    pipe.model.encoders["imagebind"].forward = lambda m, x: feature.to(x.dtype)  # ImageBind has its own parity tests
    image = Image.new("RGB", (32, 32), (200, 40, 40))

    out = pipe(META["e2e_prompt"], images=[image], max_new_tokens=8)
    assert out.token_ids[0] == REF["e2e_greedy"][0].tolist()

    seen = {}
    gen = pipe.generators[Modality.IMAGE]
    original = gen.render

    def capture(conditioning, *a, **k):
        seen.update({n: t.detach().clone() for n, t in conditioning.items()})
        return original(conditioning, *a, **k)

    gen.render = capture
    tiny = {"image": {"num_inference_steps": 1, "height": 16, "width": 16}}  # the config's settings are SD-1.5's
    out = pipe(META["e2e_prompt"], images=[image], max_new_tokens=6, settings=tiny,
               logits_processor=[_ForceFirst(ids["[IMG0]"])])
    assert out.token_ids[0][:4] == [ids[f"[IMG{i}]"] for i in range(4)] and len(out.images[0]) == 1
    close(seen["prompt_embeds"].numpy(), REF["e2e_image_conditioning"], 1e-5)


def test_stop_string_ends_generation_and_is_cut(converted: Path):
    pipe = AnyModalPipeline.from_pretrained(converted)
    proc = pipe.processor
    hashes = proc.tokenizer("###", add_special_tokens=False)["input_ids"]
    ab = proc.tokenizer("ab", add_special_tokens=False)["input_ids"]
    assert proc.stop_length(ab + hashes + ab) == len(ab) + len(hashes)
    assert proc.stop_length(ab + hashes[:2] + ab) is None
    text, _ = proc.split_output(proc.tokenizer("a cat\n###", add_special_tokens=False)["input_ids"])
    assert text == "a cat"


# ---------------------------------------------------------------- wrong files
def _convert(tmp: Path, delta: Path, llm: Path | None = None) -> None:
    convert_nextgpt(delta, llm or _vicuna(tmp), tmp / "out", progress=False, log=lambda *_: None)


def test_not_nextgpt_is_refused(tmp_path):
    torch.save({"model.layers.0.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(ConversionError, match="does not look like a NExT-GPT delta.*model.layers.0.weight"):
        _convert(tmp_path, tmp_path / "other.pt")
    assert not (tmp_path / "out").exists()


def test_truncated_file_is_refused(tmp_path):
    data = (FIX / "pytorch_model.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="cannot read .*cut.pt as plain tensors"):
        _convert(tmp_path, tmp_path / "cut.pt")


def test_random_bytes_are_named_without_torchs_advice(tmp_path):
    """Random bytes given as a delta once quoted torch's advice to retry with weights_only=False (which
    runs whatever a file holds), cut mid-sentence."""
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ConversionError) as err:
        _convert(tmp_path, tmp_path / "noise.pt")
    message = str(err.value)
    assert "noise.pt" in message and "not a torch checkpoint" in message and "\n" not in message
    assert "weights_only=False" not in message and "`weights_only` set to `False`" not in message


def test_pickled_objects_are_not_run(tmp_path):
    torch.save({"llama_proj.weight": torch.zeros(2), "x": __import__("argparse").Namespace(a=1)}, tmp_path / "obj.pt")
    with pytest.raises(ConversionError, match="weights_only"):
        _convert(tmp_path, tmp_path / "obj.pt")


def test_missing_projector_is_named(tmp_path, delta):
    torch.save({k: v for k, v in delta.items() if not k.startswith("gen_text_hidden_fcs_audio.")}, tmp_path / "part.pt")
    with pytest.raises(ConversionError, match=r"gen_text_hidden_fcs_audio\.0\.\* \(audio output projector\)"):
        _convert(tmp_path, tmp_path / "part.pt")


def test_different_base_vocabulary_is_refused(tmp_path):
    with pytest.raises(ConversionError, match="different base vocabulary.*263 tokens"):
        _convert(tmp_path, FIX / "pytorch_model.pt", _vicuna(tmp_path, extra_tokens=3))


def test_wrong_shape_is_named(tmp_path, delta):
    bad = dict(delta)
    key = "gen_text_hidden_fcs.0.tfm.decoder.layers.1.linear2.weight"
    bad[key] = torch.zeros(3, 3, dtype=torch.float16)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ConversionError, match=r"gen_text_hidden_fcs\.0\.tfm\.decoder\.layers\.1\.linear2\.weight"):
        _convert(tmp_path, tmp_path / "bad.pt")


def test_cli_reports_a_wrong_file(tmp_path, capsys):
    torch.save({"foo": torch.zeros(1)}, tmp_path / "foo.pt")
    rc = cli_main(["convert", "nextgpt", str(tmp_path / "foo.pt"), "--llm", str(_vicuna(tmp_path)),
                   "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2 and "does not look like a NExT-GPT delta" in capsys.readouterr().err


def test_alternative_key_spellings_convert(tmp_path, delta):
    """The embedding keys NExT-GPT's loader remaps (llama_model.model.embed_tokens / llama_model.lm_head)
    and LoRA keys without the adapter name convert to the same tensors."""
    renamed = {}
    for k, v in delta.items():
        k = k.replace("llama_model.base_model.model.model.embed_tokens", "llama_model.model.embed_tokens")
        k = k.replace("llama_model.base_model.model.lm_head", "llama_model.lm_head").replace(".default.weight", ".weight")
        renamed[k] = v
    torch.save(renamed, tmp_path / "alt.pt")
    a, b = plan_delta(delta), plan_delta(renamed)
    assert sorted(a.lora.values()) == sorted(b.lora.values()) and (a.rows, a.hidden) == (b.rows, b.hidden)
    _convert(tmp_path, tmp_path / "alt.pt")
    from safetensors.torch import load_file

    rows = load_file(str(tmp_path / "out" / "llm" / "token_rows.safetensors"))
    assert torch.equal(rows["output_rows"][: a.rows], delta["llama_model.base_model.model.lm_head.weight"])


# ---------------------------------------------------------------- the configurable parts
def test_media_without_placeholder_go_first_as_in_nextgpt(converted: Path):
    proc = AnyModalPipeline.from_pretrained(converted).processor
    from anymodal.processor import Message

    given = proc([proc.format([Message("user", proc.place_media("draw", {Modality.IMAGE: 1}))])])
    # demo_app.py: '<Image>x</Image> ' + ' ' + text; the text keeps one leading space (test_nextgpt_tokens.py)
    written = proc([proc.format([Message("user", "<image>  draw")])])
    assert given["input_ids"].tolist() == written["input_ids"].tolist()


def test_converted_pipeline_saves_and_reloads_every_embedding_row(converted: Path, tmp_path):
    pipe = AnyModalPipeline.from_pretrained(converted)
    pipe.save_pretrained(tmp_path / "again")
    from safetensors.torch import load_file

    rows = load_file(str(tmp_path / "again" / "llm" / "token_rows.safetensors"))
    assert rows["token_ids"].tolist() == list(range(len(pipe.processor.tokenizer)))  # base rows too
    again = AnyModalPipeline.from_pretrained(tmp_path / "again")
    a, b = pipe.model.language_model, again.model.language_model
    assert torch.equal(a.get_input_embeddings().weight, b.get_input_embeddings().weight)
    assert torch.equal(a.get_output_embeddings().weight, b.get_output_embeddings().weight)
    out_a = pipe("hello", max_new_tokens=5)
    out_b = again("hello", max_new_tokens=5)
    assert out_a.token_ids == out_b.token_ids


def test_imagebind_audio_logit_scale_option():
    from anymodal.encoders.imagebind import ImageBindEncoder

    torch.manual_seed(0)
    scaled = ImageBindEncoder.from_config({"preset": "tiny"}, ["audio"]).eval()
    plain = ImageBindEncoder.from_config({"preset": "tiny", "audio_logit_scale": False}, ["audio"]).eval()
    plain.load_state_dict(scaled.state_dict())  # one set of keys: the official checkpoint loads either way
    x = torch.randn(1, scaled.opts.audio_clips, 1, scaled.opts.num_mel_bins, scaled.opts.audio_target_len)
    with torch.no_grad():
        a, b = scaled("audio", x), plain("audio", x)
    close(a.numpy(), 20.0 * b.numpy(), 1e-6)
    with pytest.raises(ValueError, match="audio_logit_scale"):
        ImageBindEncoder.from_config({"preset": "tiny", "audio_logit_scale": "no"}, ["audio"])


@pytest.mark.parametrize("patch, message", [
    ({"template": {"user": "{content}"}}, "must give every role"),
    ({"template": {"system": "{content}", "user": "x", "assistant": "{content}", "generation": ""}}, r"template\[user\]"),
    ({"media_wrap": {"image": ["<Img>"]}}, r"media_wrap\[image\] must be \[opening_token, closing_token\]"),
    ({"signal_token_names": {"image": "[IMG]"}}, r"signal_token_names\[image\] must contain"),
    ({"stop_strings": [""]}, "stop_strings"),
])
def test_prompt_format_is_validated(patch, message):
    data = {"llm": {"config": {"model_type": "llama"}, "tokenizer": "bytes", "prompt": patch}}
    with pytest.raises(ValueError, match=message):
        AnyModalConfig.from_dict(data)


def test_shared_input_projector_is_validated():
    enc = {"imagebind": {"type": "imagebind", "modalities": ["image", "audio"], "options": {"preset": "tiny"}}}
    base = {"llm": {"config": {"model_type": "llama"}, "tokenizer": "bytes"}, "encoders": enc}
    with pytest.raises(ValueError, match=r"input_projectors\[audio\]\.share must name another"):
        AnyModalConfig.from_dict({**base, "input_projectors": {"audio": {"share": "image"}}})
    with pytest.raises(ValueError, match=r"input_projectors\[image\]\.share"):
        AnyModalConfig.from_dict({**base, "input_projectors": {"image": {"share": "image"}}})
    cfg = AnyModalConfig.from_dict({**base, "input_projectors": {"image": {"type": "mlp", "num_tokens": 2},
                                                                 "audio": {"share": "image"}}})
    assert cfg.input_projectors[Modality.AUDIO].type == "mlp" and cfg.input_projectors[Modality.AUDIO].num_tokens == 2
    assert AnyModalConfig.from_dict(cfg.to_dict()) == cfg


def test_audio_conditioning_reaches_audioldm_as_is(converted: Path):
    """NExT-GPT views its (1, 1, 512) audio output as AudioLDM's (1, 512) prompt_embeds and does not
    re-normalise it (AudioLDM normalises only the CLAP embeddings it computes itself)."""
    pipe = AnyModalPipeline.from_pretrained(converted)
    gen = pipe.generators[Modality.AUDIO]
    with torch.no_grad():
        cond = pipe.model.project_signal(Modality.AUDIO, torch.randn(1, 8, META["hidden"]))["prompt_embeds"]
    assert cond.shape == (1, 1, 32) and abs(float(cond.norm()) - 1.0) > 1e-2
    real, seen = gen.pipeline, {}

    class Recorder:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, **kwargs):
            seen.update(kwargs)
            return real(**kwargs)

    gen._pipe = Recorder()  # the generator calls self.pipeline, which returns _pipe
    gen.render({"prompt_embeds": cond}, gen.make_settings({"num_inference_steps": 1, "audio_length_s": 0.064}))
    passed = seen["prompt_embeds"]  # in the generator's dtype (the config's float16)
    assert torch.equal(passed, cond[:, 0, :].to(passed.dtype))
    with torch.no_grad():
        used = real._encode_prompt(None, "cpu", 1, False, prompt_embeds=passed)
    assert torch.equal(used, passed)
