"""Training: manifests, the three stages, frozen parameters, resume, merge-lora and 2-process DDP.

Everything runs on the tiny config with a handful of generated PNG and WAV files.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from anymodal.modality import Modality
from anymodal.training import TrainingConfig, latest_checkpoint, train
from anymodal.training.config import DEFAULT_TRAINABLE
from anymodal.training.data import load_manifest, render_dialogue, requirements

from conftest import CONFIGS, ROOT

TINY = CONFIGS / "tiny.yaml"
TRAINING = CONFIGS / "training"
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}
TONES = (220, 440, 880)
FAST = dict(device="cpu", progress=False, save_every=0)


# ============================================================================ data fixtures
def _write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    import soundfile as sf
    from PIL import Image

    d = tmp_path_factory.mktemp("data")
    (d / "img").mkdir()
    (d / "aud").mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (32, 32), rgb).save(d / "img" / f"{name}.png")
    for f in TONES:
        t = np.arange(16000) / 16000
        sf.write(d / "aud" / f"{f}.wav", (0.5 * np.sin(2 * np.pi * f * t)).astype(np.float32), 16000)
    (d / "img" / "corrupt.png").write_bytes(b"this is not a png")
    (d / "vid").mkdir()
    for name, rgb in list(COLOURS.items())[:2]:  # a colour fading in over 6 frames
        frames = [Image.new("RGB", (32, 32), tuple(int(c * k / 5) for c in rgb)) for k in range(6)]
        frames[0].save(d / "vid" / f"{name}.gif", save_all=True, append_images=frames[1:], duration=100)
    captions = [{"modality": "image", "media": f"img/{n}.png", "caption": f"a {n} square"} for n in COLOURS]
    captions += [{"modality": "audio", "media": f"aud/{f}.wav", "caption": f"a {f} hz tone"} for f in TONES]
    _write_rows(d / "captions.jsonl", captions)
    _write_rows(d / "images.jsonl", captions[:4])
    videos = [{"modality": "video", "media": f"vid/{n}.gif", "caption": f"{n} fades in"} for n in list(COLOURS)[:2]]
    _write_rows(d / "all_inputs.jsonl", captions[:2] + captions[4:6] + videos)
    dialogues = []
    for n in COLOURS:
        dialogues.append({"messages": [{"role": "user", "content": ["what is this? ", {"image": f"img/{n}.png"}]},
                                       {"role": "assistant", "content": f"a {n} square"}]})
        dialogues.append({"messages": [{"role": "user", "content": f"draw a {n} square"},
                                       {"role": "assistant", "content": ["here: ", {"image": None,
                                                                                    "caption": f"a {n} square"}]}]})
    dialogues.append({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": ["hear this ", {"audio": "aud/440.wav"}]},
        {"role": "assistant", "content": "a tone"},
        {"role": "user", "content": "make one"},
        {"role": "assistant", "content": [{"audio": None, "caption": "a 440 hz tone"}]}]})
    _write_rows(d / "dialogues.jsonl", dialogues)
    return d


@pytest.fixture(scope="module")
def taught_dir(data_dir, tmp_path_factory) -> Path:
    """A tiny pipeline whose LLM can caption the test images, with a freshly initialised image projector.

    A random LLM ignores its input, so stage 1 would have nothing to align to. The LLM and the
    image projector are first trained together (``trainable: [llm, input_projectors.image]``);
    then the projector is re-initialised, and stage 1 has to find a mapping the LLM can read.
    """
    tmp = tmp_path_factory.mktemp("taught")
    # An LLM that guesses the colour without reading the image sits at a loss of about 0.09; stage 1 then
    # has nothing to align to. At tiny.yaml's constant 1e-2 the run can fall back onto that plateau after
    # reaching it (which happens depends on the CPU's rounding); a decaying 5e-3 settles near 0.004 on
    # AVX2 and AVX-512 kernels alike.
    joint = train(TINY, data_dir / "images.jsonl", tmp / "joint", TRAINING / "tiny.yaml", stage=1, max_steps=150,
                  batch_size=4, trainable=["llm", "input_projectors.image"], learning_rate=5e-3,
                  lr_scheduler="cosine", **FAST)
    assert np.mean(joint.losses[-5:]) < 0.03, f"the taught LLM does not read the image: {joint.losses}"
    pipe = _fresh(joint.final_dir, seed=1)
    pipe.model.input_projectors["image"].proj.reset_parameters()
    pipe.save_pretrained(tmp / "pipe")
    return tmp / "pipe"


def _fresh(source: Path | str = TINY, seed: int = 0):
    from accelerate.utils import set_seed

    from anymodal.pipeline import AnyModalPipeline

    set_seed(seed)
    return AnyModalPipeline.from_pretrained(source)


def _drop(losses: list[float], k: int = 5) -> tuple[float, float]:
    return float(np.mean(losses[:k])), float(np.mean(losses[-k:]))


def _base_name(key: str) -> str | None:
    """A peft-wrapped parameter's name in the unwrapped model, or None for adapter parameters."""
    if "lora_" in key or "trainable_tokens_delta" in key:
        return None
    return (key.replace("base_model.model.", "").replace(".token_adapter", "").replace(".base_layer", ""))


def _assert_frozen_equal(before: dict, after: dict, trained_prefixes: tuple[str, ...],
                         signal_rows: list[int] | None = None) -> int:
    """Every parameter outside ``trained_prefixes`` is bit-identical; returns how many were compared."""
    mapped = {}
    for k, v in after.items():
        name = _base_name(k)
        if name is not None:
            mapped[name] = v
    assert set(before) == set(mapped), set(before) ^ set(mapped)
    compared = 0
    for k, v in before.items():
        if k.startswith(trained_prefixes):
            continue
        w = mapped[k]
        if signal_rows and (k.endswith("embed_tokens.weight") or k.endswith("lm_head.weight")):
            keep = torch.ones(v.shape[0], dtype=torch.bool)
            keep[signal_rows] = False
            v, w = v[keep], w[keep]
        assert torch.equal(v, w), f"frozen parameter {k} changed"
        compared += 1
    return compared


# ============================================================================ configs
def test_shipped_training_configs_load():
    names = sorted(p.name for p in TRAINING.glob("*.yaml") if not p.name.startswith("accelerate_"))
    assert "tiny.yaml" in names
    for name in names:
        cfg = TrainingConfig.from_yaml(TRAINING / name)
        assert cfg.trainable
    for name in TRAINING.glob("accelerate_*.yaml"):
        import yaml

        assert yaml.safe_load(name.read_text())["distributed_type"] in ("FSDP", "DEEPSPEED", "MULTI_GPU")


def test_stage_defaults_and_overrides(tmp_path):
    assert TrainingConfig(stage=2).trainable == DEFAULT_TRAINABLE[2]
    cfg = TrainingConfig.from_yaml(TRAINING / "tiny.yaml", stage=3, max_steps=7)
    assert cfg.stage == 3 and cfg.max_steps == 7 and "lora" in cfg.trainable
    assert TrainingConfig(trainable=["input_projectors.audio"]).trainable == ["input_projectors.audio"]


@pytest.mark.parametrize("fields, message", [
    ({"stage": 4}, "training.stage must be one of 1, 2, 3"),
    ({"trainable": ["decoder"]}, "unknown parameter group 'decoder'"),
    ({"trainable": ["lora.image"]}, "only the projector groups take a modality"),
    ({"trainable": ["lora", "llm"]}, "exclude each other"),
    ({"batch_size": 0}, "training.batch_size must be an integer >= 1"),
    ({"mixed_precision": "fp8"}, "training.mixed_precision must be one of"),
    ({"lr_scheduler": "exotic"}, "training.lr_scheduler"),
    ({"max_bad_fraction": 2}, "training.max_bad_fraction"),
    ({"generation_response": "{caption}"}, "must contain '{signal}'"),
    ({"ce_weight": 0, "align_weight": 0}, "nothing would train"),
    ({"batchsize": 3}, "unknown field 'batchsize'"),
])
def test_bad_training_config_raises(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainingConfig.from_dict(fields)


def test_tensorboard_without_the_package_is_a_clear_error(data_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    with pytest.raises(ValueError, match="needs the tensorboard package"):
        train(TINY, data_dir / "images.jsonl", tmp_path / "run", stage=1, tensorboard=True, **FAST)


def test_mixed_precision_needs_a_gpu(data_dir, tmp_path):
    with pytest.raises(ValueError, match="needs a GPU"):
        train(TINY, data_dir / "images.jsonl", tmp_path / "run", stage=1, mixed_precision="bf16", **FAST)


# ============================================================================ manifests
def test_bad_rows_are_reported_with_line_numbers_and_skipped(data_dir, tmp_path, caplog):
    rows = [
        {"modality": "image", "media": str(data_dir / "img" / "red.png"), "caption": "a red square"},  # 1 ok
        "{not json",  # 2
        {"modality": "image", "media": "missing.png", "caption": "x"},  # 3
        {"modality": "smell", "media": str(data_dir / "img" / "red.png"), "caption": "x"},  # 4
        {"modality": "image", "media": str(data_dir / "img" / "red.png"), "caption": "  "},  # 5
        "",  # blank lines are not rows
        {"media": str(data_dir / "img" / "red.png"), "caption": "x"},  # 7
        {"messages": [{"role": "user", "content": "hi"}]},  # 8: a dialogue in a caption stage
        {"id": 9, "modality": "image", "media": str(data_dir / "img" / "blue.png"), "caption": "a blue square"},  # ok
    ]
    path = _write_rows(tmp_path / "m.jsonl", rows)
    req = requirements(1, [Modality.IMAGE, Modality.AUDIO], [Modality.IMAGE])
    with caplog.at_level(logging.WARNING, logger="anymodal.training.data"):
        m = load_manifest(path, req)
    assert m.total == 8 and [r.line for r in m.records] == [1, 9]
    reasons = {b.line: b.reason for b in m.bad}
    assert sorted(reasons) == [2, 3, 4, 5, 7, 8]
    assert "not valid JSON" in reasons[2] and "media file not found: missing.png" in reasons[3]
    assert "unknown modality 'smell'" in reasons[4] and "caption must be a non-empty string" in reasons[5]
    assert "missing field 'modality'" in reasons[7] and "trains on caption pairs" in reasons[8]
    assert f"{path}:3: media file not found" in caplog.text
    with pytest.raises(ValueError, match=r"6 of 8 rows are bad \(75.0%\).*line 2"):
        m.check(0.5)
    m.check(0.8)


def test_dialogue_rows_are_checked(data_dir, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "hi"}]},  # no assistant turn
        {"messages": [{"role": "user", "content": [{"image": "img/red.png", "audio": "aud/440.wav"}]},
                      {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"video": "clip.mp4"}]}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": [{"image": None}]}]},  # ok
    ]
    path = _write_rows(data_dir / "dlg_bad.jsonl", rows)
    req = requirements(3, [Modality.IMAGE, Modality.AUDIO], [Modality.IMAGE])
    m = load_manifest(path, req)
    reasons = {b.line: b.reason for b in m.bad}
    assert "at least one assistant turn" in reasons[1]
    assert "exactly one modality key" in reasons[2]
    assert "cannot read video" in reasons[3]
    assert "role must be system, user or assistant" in reasons[4]
    assert [r.line for r in m.records] == [5]


def test_too_many_bad_rows_fail_the_run(data_dir, tmp_path):
    rows = [{"modality": "image", "media": f"img/{n}.png", "caption": f"a {n} square"} for n in COLOURS]
    rows += [{"modality": "image", "media": "img/nope.png", "caption": "x"}] * 2
    path = _write_rows(data_dir / "half_bad.jsonl", rows)
    with pytest.raises(ValueError, match=r"2 of 6 rows are bad .* more than training.max_bad_fraction \(10.0%\)"):
        train(TINY, path, tmp_path / "run", stage=1, max_bad_fraction=0.1, **FAST)
    assert not (tmp_path / "run" / "final").exists()


def test_undecodable_media_are_skipped_in_workers(data_dir, tmp_path):
    rows = [{"modality": "image", "media": f"img/{n}.png", "caption": f"a {n} square"} for n in COLOURS]
    rows.append({"modality": "image", "media": "img/corrupt.png", "caption": "noise"})  # line 5: exists, unreadable
    path = _write_rows(data_dir / "corrupt.jsonl", rows)
    result = train(TINY, path, tmp_path / "run", stage=1, max_steps=4, batch_size=5, num_workers=2,
                   max_bad_fraction=0.3, **FAST)
    assert result.bad_rows == 1 and result.steps == 4
    assert result.samples == 4 * 4  # the bad row never reaches the model
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["bad_rows"] == 1
    # a batch whose only row is bad still steps (every process must), but logs no loss
    alone = train(TINY, path, tmp_path / "alone", stage=1, max_steps=5, batch_size=1, max_bad_fraction=0.3, **FAST)
    assert alone.bad_rows == 1 and sum(np.isnan(alone.losses)) == 1 and alone.samples == 4
    with pytest.raises(ValueError, match="1 of 5 rows are bad"):
        train(TINY, path, tmp_path / "run2", stage=1, max_steps=2, batch_size=5, max_bad_fraction=0.1, **FAST)


def test_dialogue_loss_mask_covers_assistant_turns_only():
    from anymodal.processor import AnyModalProcessor, Message
    from anymodal.tokenization import byte_level_tokenizer

    proc = AnyModalProcessor(byte_level_tokenizer(), {Modality.IMAGE: 2}, {Modality.IMAGE: 1}, system_prompt="sys")
    msgs = [Message("user", "hi <image>"), Message("assistant", "yo</s>"), Message("user", "more"),
            Message("assistant", "<img_0><img_1></s>")]
    text, spans = render_dialogue(proc, msgs)
    assert [text[a:b] for a, b in spans] == [" yo</s>", " <img_0><img_1></s>"]
    assert text.startswith("sys\n### Human: hi <image>\n")


def test_dialogue_samples_learn_only_the_assistants_tokens():
    """The labels of a built sample (what the loss sees), not only the spans: everything the user or
    the system wrote is ignored, and every token an assistant turn adds, up to its EOS, is learned."""
    from anymodal.processor import AnyModalProcessor
    from anymodal.tokenization import byte_level_tokenizer
    from anymodal.training.data import IGNORE_INDEX, DialogueRecord, SampleBuilder, Turn

    proc = AnyModalProcessor(byte_level_tokenizer(), {Modality.IMAGE: 2}, {Modality.IMAGE: 1}, system_prompt="sys")
    builder = SampleBuilder(3, proc, {}, "Describe this {modality}.", "{caption}", "{signal}")
    record = DialogueRecord(7, [Turn("user", ["hi there"]), Turn("assistant", ["yo"]), Turn("user", ["more please"]),
                                Turn("assistant", ["sure"])])
    sample = builder(record)
    learned = [i for i, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(sample.input_ids, sample.labels))
    eos = proc.tokenizer.eos_token
    assert proc.tokenizer.decode(learned) == f" yo{eos} sure{eos}"
    # nothing of the user's turns is learned, whatever the tokenizer merges
    ignored = proc.tokenizer.decode([i for i, label in zip(sample.input_ids, sample.labels) if label == IGNORE_INDEX])
    assert "hi there" in ignored and "more please" in ignored and "sys" in ignored


def test_dialogue_loss_mask_with_a_chat_template():
    from anymodal.processor import AnyModalProcessor, Message
    from anymodal.tokenization import byte_level_tokenizer

    tok = byte_level_tokenizer()
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    proc = AnyModalProcessor(tok, {Modality.IMAGE: 1}, {Modality.IMAGE: 1})
    msgs = [Message("user", "hi"), Message("assistant", "yo"), Message("user", "draw"), Message("assistant", "<img_0>")]
    text, spans = render_dialogue(proc, msgs)
    assert [text[a:b] for a, b in spans] == ["yo<|im_end|>", "<img_0><|im_end|>"]


@pytest.mark.parametrize("tied", [False, True])
def test_signal_token_delta_trains_only_its_rows_and_folds_exactly(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    from anymodal.training.stages import SignalTokenDelta

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=40,
                                      tie_word_embeddings=tied)).eval()
    lm.requires_grad_(False)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    delta = SignalTokenDelta(lm, [37, 38])
    assert (delta.delta_out is None) == tied
    ids = torch.tensor([[1, 5, 37, 38, 2]])
    opt = torch.optim.AdamW(delta.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        loss = lm(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items())  # nothing moved under the hooks
    with torch.no_grad():
        hooked = lm(ids).logits
        delta.fold()
        folded = lm(ids).logits
    assert torch.allclose(hooked, folded, atol=1e-5)
    changed = (lm.model.embed_tokens.weight != before["model.embed_tokens.weight"]).any(dim=1).nonzero().flatten()
    assert changed.tolist() == [37, 38]


# ============================================================================ stages
def test_stage1_trains_input_projectors_only(taught_dir, data_dir, tmp_path):
    before = _fresh(taught_dir).model.state_dict()
    result = train(taught_dir, data_dir / "images.jsonl", tmp_path / "s1", TRAINING / "tiny.yaml", stage=1,
                   max_steps=60, batch_size=4, learning_rate=3e-2, **FAST)
    first, last = _drop(result.losses)
    assert last < 0.3 * first, result.losses  # about 0.30 -> 0.004 on either CPU path
    after = result.pipeline.model.state_dict()
    n = _assert_frozen_equal(before, after, ("input_projectors.image",))
    assert n > 100
    assert not torch.equal(before["input_projectors.image.proj.weight"], after["input_projectors.image.proj.weight"])
    # the saved result loads and reproduces the trained weights
    again = _fresh(result.final_dir).model.state_dict()
    assert all(torch.equal(after[k], again[k]) for k in after)


def test_stage1_trains_every_input_modality_present(data_dir, tmp_path):
    before = _fresh().model.state_dict()
    result = train(TINY, data_dir / "all_inputs.jsonl", tmp_path / "all", TRAINING / "tiny.yaml", stage=1,
                   max_steps=2, batch_size=6, **FAST)
    after = result.pipeline.model.state_dict()
    _assert_frozen_equal(before, after, ("input_projectors",))
    for m in ("image", "audio", "video"):
        keys = [k for k in before if k.startswith(f"input_projectors.{m}.")]
        assert any(not torch.equal(before[k], after[k]) for k in keys), m


@pytest.mark.parametrize("group, trained, untouched", [
    ("input_projectors.image", "input_projectors.image.", "input_projectors.audio."),
    ("input_projectors.audio", "input_projectors.audio.", "input_projectors.image."),
])
def test_a_stage_naming_one_modality_trains_that_projector_alone(data_dir, tmp_path, group, trained, untouched):
    """``trainable: [input_projectors.image]`` on data with images and audio: the audio projector gets
    gradients from the loss too, and must still not move (nor be trainable)."""
    from anymodal.training.stages import setup_stage, trainable_names

    tcfg = TrainingConfig.from_yaml(TRAINING / "tiny.yaml", stage=1, trainable=[group], save_every=0, progress=False)
    names = trainable_names(setup_stage(_fresh(), tcfg).model)
    assert names and all(n.startswith(trained) for n in names), names
    before = _fresh().model.state_dict()
    result = train(TINY, data_dir / "captions.jsonl", tmp_path / "run", TRAINING / "tiny.yaml", stage=1,
                   max_steps=2, batch_size=7, trainable=[group], **FAST)
    after = result.pipeline.model.state_dict()
    _assert_frozen_equal(before, after, (trained,))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(trained))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(untouched))


def test_stage2_trains_output_projectors_and_signal_rows(data_dir, tmp_path):
    before = _fresh().model.state_dict()
    out = tmp_path / "s2"
    result = train(TINY, data_dir / "captions.jsonl", out, TRAINING / "tiny.yaml", stage=2, max_steps=30,
                   batch_size=7, **FAST)
    first, last = _drop(result.losses)
    assert last < 0.5 * first, result.losses
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"ce", "align/image", "align/audio"} <= set(metrics[0])
    for key in ("ce", "align/image", "align/audio"):
        assert metrics[-1][key] < metrics[0][key], key
    pipe = result.pipeline
    signal = sorted(i for ids in pipe.processor.signal_ids.values() for i in ids)
    after = pipe.model.state_dict()
    _assert_frozen_equal(before, after, ("output_projectors.image", "output_projectors.audio"), signal_rows=signal)
    emb = "language_model.model.embed_tokens.weight"
    assert not torch.equal(before[emb][signal], after[emb][signal])  # the signal rows did train
    video = [k for k in before if k.startswith("output_projectors.video")]
    assert video and all(torch.equal(before[k], after[k]) for k in video)  # no video data: untouched
    for m in ("image", "audio"):
        k = f"output_projectors.{m}.out_proj.prompt_embeds.weight"
        assert not torch.equal(before[k], after[k])
    # targets are cached per generator and caption, and reused
    cache = out / "target_cache"
    dirs = sorted(p.name for p in cache.iterdir())
    assert [d.split("-")[0] for d in dirs] == ["audio", "image"]
    assert len(list((cache / dirs[1]).rglob("*.safetensors"))) == 4
    from anymodal.training.data import TargetCache

    tc = TargetCache(cache, {Modality.IMAGE: dirs[1]})
    t = tc.load(Modality.IMAGE, "a red square")["prompt_embeds"]
    ref = pipe.generators[Modality.IMAGE].encode_text(["a red square"])["prompt_embeds"][0]
    assert torch.allclose(t, ref, atol=1e-6)
    assert tc.fill(Modality.IMAGE, ["a red square"], lambda c: pytest.fail("recomputed a cached target")) == 0


def test_stage_alignment_reads_the_hidden_layer_each_projector_is_configured_for(data_dir, tmp_path, monkeypatch):
    """output_projectors.image.hidden_layer: 1 -> stage 2 aligns the image block's states from
    transformers' hidden_states[1] of the same forward pass, the audio block's from the last."""
    import anymodal.training.stages as st
    from anymodal.config import AnyModalConfig
    from anymodal.model import AnyModalModel

    cfg = AnyModalConfig.from_yaml(TINY)
    cfg.output_projectors[Modality.IMAGE].hidden_layer = 1
    cfg.to_yaml(tmp_path / "layer1.yaml")
    read, outs = [], []
    real_read, real_forward = st.signal_hidden_states, AnyModalModel.forward

    def spy_read(hidden, input_ids, block_ids):
        read.append((hidden, block_ids))
        return real_read(hidden, input_ids, block_ids)

    def spy_forward(self, *args, **kwargs):
        outs.append(real_forward(self, *args, **kwargs))
        return outs[-1]

    monkeypatch.setattr(st, "signal_hidden_states", spy_read)
    monkeypatch.setattr(AnyModalModel, "forward", spy_forward)
    result = train(tmp_path / "layer1.yaml", data_dir / "captions.jsonl", tmp_path / "s2", TRAINING / "tiny.yaml",
                   stage=2, max_steps=1, batch_size=7, **FAST)
    ids = result.pipeline.processor.signal_ids
    states = outs[-1].hidden_states
    by_block = {tuple(block): hidden for hidden, block in read}
    assert by_block[tuple(ids[Modality.IMAGE])] is states[1]
    assert by_block[tuple(ids[Modality.AUDIO])] is states[-1]
    assert result.pipeline.model.signal_layer(Modality.IMAGE) == 1
    assert AnyModalConfig.from_yaml(tmp_path / "s2" / "final" / "config.yaml").output_projectors[
        Modality.IMAGE].hidden_layer == 1  # the saved pipeline keeps the layer


CODI2 = CONFIGS / "tiny-codi2.yaml"


def test_stage2_unclip_targets_are_the_generators_embeddings_of_the_target_images(data_dir, tmp_path):
    """unCLIP is conditioned on image embeddings, which a caption cannot give: stage 2 aligns the
    output projector with the generator's own encode_media of each row's image file."""
    from anymodal.training.data import TargetCache, file_key

    before = _fresh(CODI2).model.state_dict()
    before_unet = _fresh(CODI2).generators[Modality.IMAGE].pipeline.unet.state_dict()
    out = tmp_path / "codi2"
    result = train(CODI2, data_dir / "images.jsonl", out, TRAINING / "tiny.yaml", stage=2, max_steps=30,
                   batch_size=4, **FAST)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    align = [m["align/image"] for m in metrics]
    assert "align/audio" not in metrics[0]  # no audio rows: the audio projector is not trained
    assert np.mean(align[-5:]) < 0.6 * np.mean(align[:5]), align
    pipe = result.pipeline
    signal = sorted(i for ids in pipe.processor.signal_ids.values() for i in ids)
    after = pipe.model.state_dict()
    lora = [k for k in before if _base_name(k) is None]  # codi2's LLM carries its (untrained) LoRA adapter
    assert lora and all(torch.equal(before[k], after[k]) for k in lora)
    _assert_frozen_equal({_base_name(k): v for k, v in before.items() if k not in lora}, after,
                         ("output_projectors.image",), signal_rows=signal)
    key = "output_projectors.image.out_proj.image_embeds.weight"
    assert not torch.equal(before[key], after[key])
    unet = pipe.generators[Modality.IMAGE].pipeline.unet.state_dict()
    assert all(torch.equal(before_unet[k], unet[k]) for k in before_unet)
    # the cached targets are encode_media of the files, keyed by the files' content
    gen = pipe.generators[Modality.IMAGE]
    (ident,) = [p.name for p in (out / "target_cache").iterdir()]
    assert ident.startswith("image-stable-unclip-")
    assert len(list((out / "target_cache" / ident).rglob("*.safetensors"))) == 4
    red = data_dir / "img" / "red.png"
    cache = TargetCache(out / "target_cache", {Modality.IMAGE: ident}, [Modality.IMAGE])
    cache.media_keys[str(red)] = file_key(red)
    target = cache.target(Modality.IMAGE, "ignored: the caption is not the target", red)["image_embeds"]
    assert torch.allclose(target, gen.encode_media([red])["image_embeds"][0], atol=1e-6)
    assert cache.fill_media(Modality.IMAGE, [red], lambda p: pytest.fail("recomputed a cached target")) == (0, [])


def test_stage2_media_targets_need_the_file_and_skip_unreadable_ones(data_dir, tmp_path, caplog):
    """A caption pair for a media-target output without its file is a bad row naming why; a file that
    cannot be encoded is found when the targets are computed, and its row is skipped."""
    req = requirements(2, [Modality.IMAGE], [Modality.IMAGE, Modality.AUDIO], media_targets=[Modality.IMAGE])
    rows = _write_rows(tmp_path / "rows.jsonl", [
        {"modality": "image", "caption": "a red square"},
        {"modality": "audio", "caption": "a tone"},  # text targets: no file needed
        {"modality": "image", "media": str(data_dir / "img" / "red.png"), "caption": "a red square"}])
    m = load_manifest(rows, req, log=False)
    assert [b.line for b in m.bad] == [1] and "alignment target is its encoding of the target medium" in m.bad[0].reason
    assert [r.path is not None for r in m.records] == [False, True]

    corrupt = _write_rows(tmp_path / "corrupt.jsonl", [
        {"modality": "image", "media": str(data_dir / "img" / n), "caption": f"a {n}"}
        for n in ["red.png", "green.png", "blue.png", "white.png", "corrupt.png"]])
    with caplog.at_level(logging.WARNING):
        result = train(CODI2, corrupt, tmp_path / "c", TRAINING / "tiny.yaml", stage=2, max_steps=2, batch_size=5,
                       max_bad_fraction=0.5, **FAST)
    assert result.bad_rows == 1
    assert "no image alignment target" in caplog.text and "corrupt.png" in caplog.text


def test_stage2_denoising_loss_through_the_frozen_unclip_unet(data_dir, tmp_path):
    """unCLIP's UNet takes the image embedding as class labels (noised at the configured noise_level,
    joined with its level embedding) and the empty prompt as text: the gradient reaches the projector."""
    gen = _fresh(CODI2).generators[Modality.IMAGE]
    embeds = torch.randn(2, 1, 16, requires_grad=True)
    kwargs = gen.unet_conditioning({"image_embeds": embeds})
    assert kwargs["class_labels"].shape == (2, 32) and kwargs["encoder_hidden_states"].shape[0] == 2
    kwargs["class_labels"].sum().backward()
    assert embeds.grad.abs().sum() > 0

    before_unet = gen.pipeline.unet.state_dict()
    result = train(CODI2, data_dir / "images.jsonl", tmp_path / "dn", TRAINING / "tiny.yaml", stage=2, max_steps=2,
                   batch_size=4, align_weight=0.0, denoise_weight=1.0, trainable=["output_projectors.image"], **FAST)
    metrics = [json.loads(line) for line in (tmp_path / "dn" / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(k for k in m if "/" in k) for m in metrics] == [["denoise/image"]] * 2
    assert all(np.isfinite(m["denoise/image"]) for m in metrics)
    assert not (tmp_path / "dn" / "target_cache").exists()  # no alignment: no targets computed
    unet = result.pipeline.generators[Modality.IMAGE].pipeline.unet.state_dict()
    assert all(torch.equal(before_unet[k], unet[k]) for k in before_unet)
    fresh = _fresh(CODI2).model.output_projectors["image"].state_dict()
    trained = result.pipeline.model.output_projectors["image"].state_dict()
    assert any(not torch.equal(fresh[k], trained[k]) for k in fresh)


def test_stage2_denoising_loss_through_the_frozen_unet(data_dir, tmp_path):
    before = _fresh().generators[Modality.IMAGE].pipeline.unet.state_dict()
    result = train(TINY, data_dir / "images.jsonl", tmp_path / "dn", TRAINING / "tiny.yaml", stage=2, max_steps=3,
                   batch_size=4, denoise_weight=1.0, **FAST)
    metrics = [json.loads(line) for line in (tmp_path / "dn" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["denoise/image"]) for m in metrics)
    after = result.pipeline.generators[Modality.IMAGE].pipeline.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_stage2_denoising_loss_through_the_frozen_video_unet(data_dir, tmp_path):
    """Video clips are encoded frame by frame into (B, C, F, h, w) latents for the UNet3D; only the
    output projector trains, and its gradient comes through the frozen UNet."""
    _write_rows(tmp_path / "videos.jsonl", [json.loads(line) for line in
                                            (data_dir / "all_inputs.jsonl").read_text().splitlines()][-2:])
    (tmp_path / "vid").symlink_to(data_dir / "vid")
    before = _fresh().generators[Modality.VIDEO].pipeline.unet.state_dict()
    result = train(TINY, tmp_path / "videos.jsonl", tmp_path / "dn", TRAINING / "tiny.yaml", stage=2, max_steps=2,
                   batch_size=2, align_weight=0.0, denoise_weight=1.0, trainable=["output_projectors.video"], **FAST)
    metrics = [json.loads(line) for line in (tmp_path / "dn" / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(k for k in m if "/" in k and np.isfinite(m[k])) for m in metrics] == [["denoise/video"]] * 2
    assert metrics[0]["loss"] == pytest.approx(metrics[0]["ce"] + metrics[0]["denoise/video"], rel=1e-5)
    after = result.pipeline.generators[Modality.VIDEO].pipeline.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    fresh = _fresh().model.output_projectors["video"].state_dict()
    trained = result.pipeline.model.output_projectors["video"].state_dict()
    assert any(not torch.equal(fresh[k], trained[k]) for k in fresh)


def test_denoiser_noises_as_in_training_whatever_the_sampler():
    """A pipeline shipped with a sampler (DPM-Solver has no add_noise/get_velocity) still gets a
    denoising loss: noise comes from a DDPM scheduler with the same betas and prediction type."""
    from diffusers import DPMSolverMultistepScheduler

    from anymodal.training.losses import ImageDenoiser

    wrapper = _fresh().generators[Modality.IMAGE]
    gen = wrapper.pipeline
    sampler = DPMSolverMultistepScheduler.from_config(gen.scheduler.config, prediction_type="v_prediction")
    d = ImageDenoiser(gen.unet, gen.vae, sampler)
    assert type(d.scheduler).__name__ == "DDPMScheduler"
    assert d.scheduler.config.prediction_type == "v_prediction"
    assert torch.equal(d.scheduler.betas, sampler.betas)
    cond = {"prompt_embeds": torch.randn(2, *wrapper.conditioning_shapes["prompt_embeds"], requires_grad=True)}
    loss = d(cond, torch.rand(2, 3, d.image_size, d.image_size) * 2 - 1)
    loss.backward()
    assert torch.isfinite(loss) and cond["prompt_embeds"].grad.abs().sum() > 0


def test_video_for_vae_samples_frames_in_unit_range(data_dir):
    from anymodal.training.losses import VideoForVAE

    clip = VideoForVAE(num_frames=4, height=16, width=24)(data_dir / "vid" / "red.gif")
    assert clip.shape == (3, 4, 16, 24)
    assert float(clip.min()) >= -1.0 and float(clip.max()) <= 1.0
    red = clip[0].mean(dim=(1, 2))
    assert bool((red[1:] > red[:-1]).all())  # the fade-in, in order


def test_denoise_modalities_pick_outputs_and_name_what_is_wrong(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"denoise_modalities: \['audio'\] not supported"):
        TrainingConfig(stage=2, denoise_weight=1.0, denoise_modalities=["audio"])
    with pytest.raises(ValueError, match="at least one modality"):
        TrainingConfig(stage=2, denoise_weight=1.0, denoise_modalities=[])
    with pytest.raises(ValueError, match="uses 'audioldm'.*denoise_modalities"):
        train(TINY, data_dir / "captions.jsonl", tmp_path / "all", TRAINING / "tiny.yaml", stage=2, max_steps=1,
              batch_size=4, denoise_weight=1.0, **FAST)
    with pytest.raises(ValueError, match="names video, but the data generates only audio, image"):
        train(TINY, data_dir / "captions.jsonl", tmp_path / "v", TRAINING / "tiny.yaml", stage=2, max_steps=1,
              batch_size=4, denoise_weight=1.0, denoise_modalities=["video"], **FAST)
    train(TINY, data_dir / "captions.jsonl", tmp_path / "img", TRAINING / "tiny.yaml", stage=2, max_steps=2,
          batch_size=4, denoise_weight=1.0, denoise_modalities=["image"], **FAST)
    metrics = [json.loads(line) for line in (tmp_path / "img" / "metrics.jsonl").read_text().splitlines()]
    assert any(np.isfinite(m.get("denoise/image", float("nan"))) for m in metrics)
    assert not any(np.isfinite(m.get("denoise/audio", float("nan"))) for m in metrics)


def test_stage3_lora_trains_and_merge_lora_matches(data_dir, tmp_path):
    from anymodal.cli import main
    from anymodal.pipeline import AnyModalPipeline

    before = _fresh().model.state_dict()
    out = tmp_path / "s3"
    result = train(TINY, data_dir / "dialogues.jsonl", out, TRAINING / "tiny.yaml", stage=3, max_steps=30,
                   batch_size=9, **FAST)
    first, last = _drop(result.losses)
    assert last < 0.7 * first, result.losses
    after = result.pipeline.model.state_dict()
    assert any("lora_A" in k for k in after) and any("trainable_tokens_delta" in k for k in after)
    _assert_frozen_equal(before, after, ("input_projectors", "output_projectors"))
    final = result.final_dir
    assert (final / "llm_adapter" / "adapter_model.safetensors").is_file()
    assert not list(final.rglob("*.bin")) and not list(final.rglob("*.pt"))

    unmerged = AnyModalPipeline.from_pretrained(final)
    assert main(["merge-lora", str(final), "--out", str(tmp_path / "merged")]) == 0
    merged = AnyModalPipeline.from_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged" / "llm_adapter").exists()
    from anymodal.processor import Message

    ids = unmerged.processor([unmerged.processor.format([Message("user", "draw a red square")])])["input_ids"]
    with torch.no_grad():
        a = unmerged.model(ids, output_hidden_states=True)
        b = merged.model(ids, output_hidden_states=True)
    assert torch.allclose(a.logits, b.logits, atol=1e-4)
    assert unmerged("draw a red square", seed=0).token_ids == merged("draw a red square", seed=0).token_ids


def test_resume_after_interruption_gives_identical_weights(data_dir, tmp_path):
    kwargs = dict(stage=3, max_steps=9, batch_size=3, gradient_accumulation_steps=2, save_every=4, device="cpu",
                  progress=False)
    whole = train(TINY, data_dir / "dialogues.jsonl", tmp_path / "a", TRAINING / "tiny.yaml", **kwargs)

    class Interrupted(Exception):
        pass

    def stop(step: int, metrics: dict) -> None:
        if step == 6:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(TINY, data_dir / "dialogues.jsonl", tmp_path / "b", TRAINING / "tiny.yaml", on_step=stop, **kwargs)
    assert latest_checkpoint(tmp_path / "b").name == "step-00000004"
    assert not list((tmp_path / "b" / "checkpoints").glob(".*"))  # no temporary directory left behind
    with pytest.raises(ValueError, match="pass --resume"):
        train(TINY, data_dir / "dialogues.jsonl", tmp_path / "b", TRAINING / "tiny.yaml", **kwargs)
    resumed = train(TINY, data_dir / "dialogues.jsonl", tmp_path / "b", TRAINING / "tiny.yaml", resume=True, **kwargs)
    assert resumed.losses == whole.losses[4:]
    a, b = whole.pipeline.model.state_dict(), resumed.pipeline.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))


class _Planted:
    """Unpickling this creates ``path``: the payload a hostile checkpoint would carry."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_resume_refuses_planted_pickles(data_dir, tmp_path):
    import pickle
    import shutil

    kwargs = dict(stage=3, max_steps=2, batch_size=3, save_every=1, device="cpu", progress=False)
    train(TINY, data_dir / "dialogues.jsonl", tmp_path / "run", TRAINING / "tiny.yaml", **kwargs)
    ckpt = latest_checkpoint(tmp_path / "run")
    assert (ckpt / "scheduler.json").is_file() and not list(ckpt.glob("custom_checkpoint_*"))
    pristine = tmp_path / "pristine"
    shutil.copytree(ckpt, pristine)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Planted(marker))
    pickle.loads(payload)  # the payload is live: plain unpickling runs it
    assert marker.exists()
    marker.unlink()

    def attempt(plant, match: str) -> None:
        shutil.rmtree(ckpt)
        shutil.copytree(pristine, ckpt)
        plant()
        with pytest.raises(ValueError, match=match):
            train(TINY, data_dir / "dialogues.jsonl", tmp_path / "run", TRAINING / "tiny.yaml", resume=True,
                  **{**kwargs, "max_steps": 3})
        assert not marker.exists()

    # accelerate's name for a registered object's pickle, beside anymodal's scheduler.json
    attempt(lambda: (ckpt / "custom_checkpoint_0.pkl").write_bytes(payload), "custom_checkpoint_0.pkl")
    # an older checkpoint's scheduler pickle: read with weights_only=True, so refused, not run
    attempt(lambda: ((ckpt / "scheduler.json").unlink(), (ckpt / "custom_checkpoint_0.pkl").write_bytes(payload)),
            "cannot be read safely")
    attempt(lambda: (ckpt / "random_states_0.pkl").write_bytes(payload), "random_states_0.pkl")
    attempt(lambda: (ckpt / "optimizer.bin").write_bytes(payload), "optimizer.bin")
    attempt(lambda: (ckpt / "pytorch_model.bin").write_bytes(payload), "does not write")
    # the untouched checkpoint still resumes
    shutil.rmtree(ckpt)
    shutil.copytree(pristine, ckpt)
    train(TINY, data_dir / "dialogues.jsonl", tmp_path / "run", TRAINING / "tiny.yaml", resume=True,
          **{**kwargs, "max_steps": 3})


def test_cli_train_and_errors(data_dir, tmp_path, capsys):
    from anymodal.cli import main

    rc = main(["train", "--stage", "1", "--config", str(TINY), "--data", str(data_dir / "captions.jsonl"),
               "--out", str(tmp_path / "cli"), "--training-config", str(TRAINING / "tiny.yaml"),
               "--max-steps", "2", "--device", "cpu", "--no-progress"])
    assert rc == 0
    assert "stage 1: 2 steps" in capsys.readouterr().out
    assert (tmp_path / "cli" / "final" / "anymodal_index.json").is_file()
    rc = main(["merge-lora", str(tmp_path / "cli" / "final"), "--out", str(tmp_path / "m")])
    assert rc == 2 and "has no LoRA adapter" in capsys.readouterr().err


def test_two_process_accelerate_launch(data_dir, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` with ACCELERATE_USE_CPU=1 runs two gloo ranks."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "anymodal", "train",
           "--stage", "2", "--config", str(TINY), "--data", str(data_dir / "captions.jsonl"), "--out", str(out),
           "--training-config", str(TRAINING / "tiny.yaml"), "--max-steps", "4", "--batch-size", "2",
           "--save-every", "2", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[0]["samples"] == 2 * 2  # two processes, two rows each
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and {p.name for p in ckpt.glob("random_states_*.pkl")} == {
        "random_states_0.pkl", "random_states_1.pkl"}
    assert (out / "final" / "anymodal_index.json").is_file()


def test_gradient_checkpointing_gives_the_same_losses(data_dir, tmp_path):
    kwargs = dict(stage=3, max_steps=3, batch_size=4, **FAST)
    plain = train(TINY, data_dir / "dialogues.jsonl", tmp_path / "a", TRAINING / "tiny.yaml", **kwargs)
    ckpt = train(TINY, data_dir / "dialogues.jsonl", tmp_path / "b", TRAINING / "tiny.yaml",
                 gradient_checkpointing=True, **kwargs)
    assert ckpt.pipeline.model.language_model.is_gradient_checkpointing
    np.testing.assert_allclose(ckpt.losses, plain.losses, rtol=1e-5)


def test_stages_chain_through_saved_directories(data_dir, tmp_path, capsys):
    from anymodal.cli import main
    from anymodal.pipeline import AnyModalPipeline

    common = ["--training-config", str(TRAINING / "tiny.yaml"), "--max-steps", "2", "--device", "cpu", "--no-progress"]
    source = str(TINY)
    for stage, data in ((1, "captions.jsonl"), (2, "captions.jsonl"), (3, "dialogues.jsonl")):
        out = tmp_path / f"s{stage}"
        assert main(["train", "--stage", str(stage), "--config", source, "--data", str(data_dir / data),
                     "--out", str(out), *common]) == 0
        source = str(out / "final")
    pipe = AnyModalPipeline.from_pretrained(source)
    assert pipe.config.llm.lora is not None
    out = pipe("draw a red square", max_new_tokens=4, seed=0)
    assert len(out.text) == 1


def test_killed_subprocess_resumes_to_identical_weights(data_dir, tmp_path):
    """SIGKILL a real training process after its first checkpoint, resume it, compare with a clean run."""
    import signal
    import time

    args = ["--stage", "2", "--config", str(TINY), "--data", str(data_dir / "captions.jsonl"),
            "--training-config", str(TRAINING / "tiny.yaml"), "--max-steps", "60", "--batch-size", "3",
            "--save-every", "10", "--device", "cpu", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "anymodal", "train", *args, "--out", str(killed)], env=env,
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while latest_checkpoint(killed) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "final").exists()
    from anymodal.cli import main

    assert main(["train", *args, "--out", str(killed), "--resume"]) == 0
    assert main(["train", *args, "--out", str(tmp_path / "clean")]) == 0
    from safetensors.torch import load_file

    for rel in ("output_projectors/image.safetensors", "output_projectors/audio.safetensors", "llm/model.safetensors"):
        a, b = load_file(str(tmp_path / "clean" / "final" / rel)), load_file(str(killed / "final" / rel))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel


@pytest.mark.slow
def test_two_process_run_resumes_to_identical_weights(data_dir, tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "anymodal", "train",
              "--stage", "3", "--config", str(TINY), "--data", str(data_dir / "dialogues.jsonl"),
              "--training-config", str(TRAINING / "tiny.yaml"), "--batch-size", "2", "--save-every", "4",
              "--no-progress"]
    # The tiny config's schedule is constant after warm-up, so a 5-step run checkpointed at step 4 and
    # resumed to 8 steps must match a plain 8-step run exactly.
    for extra in (["--out", str(tmp_path / "a"), "--max-steps", "8"], ["--out", str(tmp_path / "b"), "--max-steps", "5"],
                  ["--out", str(tmp_path / "b"), "--max-steps", "8", "--resume"]):
        proc = subprocess.run(launch + extra, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    for rel in ("llm_adapter/adapter_model.safetensors", "input_projectors/image.safetensors",
                "output_projectors/image.safetensors"):
        a, b = load_file(str(tmp_path / "a" / "final" / rel)), load_file(str(tmp_path / "b" / "final" / rel))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel


def test_saving_from_a_gathered_state_dict_matches(data_dir, tmp_path):
    """The path sharded runs (FSDP, ZeRO) save through: rebuild, load the full state dict, save."""
    from anymodal.training.stages import setup_stage
    from anymodal.training.trainer import save_from_state_dict

    result = train(TINY, data_dir / "captions.jsonl", tmp_path / "run", TRAINING / "tiny.yaml", stage=2,
                   max_steps=3, batch_size=7, **FAST)
    # what accelerator.get_state_dict would gather: the stage module before the delta is folded
    tcfg = TrainingConfig.from_yaml(TRAINING / "tiny.yaml", stage=2, max_steps=3, batch_size=7, save_every=0,
                                    progress=False)
    pipe = _fresh()
    stage = setup_stage(pipe, tcfg)
    trained = _fresh(result.final_dir).model
    with torch.no_grad():
        for m in ("image", "audio", "video"):
            stage.model.output_projectors[m].load_state_dict(trained.output_projectors[m].state_dict())
        emb = trained.language_model.get_input_embeddings().weight
        head = trained.language_model.get_output_embeddings().weight
        ids = stage.signal_delta.token_ids
        stage.signal_delta.delta_in.copy_(emb[ids] - pipe.model.language_model.get_input_embeddings().weight[ids])
        stage.signal_delta.delta_out.copy_(head[ids] - pipe.model.language_model.get_output_embeddings().weight[ids])
    save_from_state_dict(TINY, tcfg, stage.state_dict(), tmp_path / "rebuilt")
    a, b = trained.state_dict(), _fresh(tmp_path / "rebuilt").model.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    with pytest.raises(ValueError, match="lacks trained parameters"):
        save_from_state_dict(TINY, tcfg, {}, tmp_path / "nothing")


def test_a_run_on_another_device_gets_a_fresh_accelerate_state(monkeypatch):
    """accelerate fixes one device per process at the first Accelerator; a later single-process run
    asking for the other device must not silently keep it."""
    from accelerate.state import PartialState

    from anymodal.training.trainer import _release_other_device_state

    PartialState(cpu=True)
    _release_other_device_state(cpu=True)  # same device: the state stays
    assert PartialState._shared_state and PartialState().device.type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    _release_other_device_state(cpu=False)
    assert not PartialState._shared_state  # the next Accelerator chooses afresh
