"""The model-side toy-world phases (anymodal/toyworld/ manifests.py, encoder.py, llm.py, stages.py,
ship.py) at smoke size: manifests the training code reads, a tiny ImageBind and a tiny Llama that
resume bit-identically, the three anymodal stages on top, a pipeline that loads and answers,
``anymodal eval`` on it, and shipping."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from anymodal.modality import Modality
from anymodal.toyworld import encoder as ENC
from anymodal.toyworld import loop as L
from anymodal.toyworld import llm as LLM
from anymodal.toyworld import manifests as MF
from anymodal.toyworld import recipe as R
from anymodal.toyworld import ship as SH
from anymodal.toyworld import stages as ST
from anymodal.toyworld import train as T
from anymodal.toyworld import world

torch.set_num_threads(1)

SMOKE = R.ModelPhasesConfig.preset("smoke")


def _control(**kw) -> L.RunControl:
    return L.RunControl(progress=False, **kw)


def _log(out: Path, name: str) -> L.JsonlLog:
    return L.JsonlLog(out / "logs" / f"{name}.jsonl")


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {f"{f.name}/{k}": v for f in sorted(directory.rglob("*.safetensors")) for k, v in load_file(f).items()}


def _copy_base(base: Path, out: Path, *names: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(base / name, out / name)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The train.py phases the model side builds on (tokenizer, both generators), at smoke size."""
    from dataclasses import replace

    out = tmp_path_factory.mktemp("toy")
    cfg = T.ToyworldTrainConfig.preset("smoke")
    fast = dict(vae_steps=1, steps=1, checkpoint_every=1, final_eval_prompts=1)  # loadable, not trained
    cfg = replace(cfg, image_generator=replace(cfg.image_generator, **fast),
                  audio_generator=replace(cfg.audio_generator, **fast))
    results = T.train(out, phases=["tokenizer", "image-vae", "image-generator", "audio-generator"], config=cfg,
                      results_dir=None, progress=False)
    assert [r.status for r in results] == ["done"] * 4
    return out


@pytest.fixture(scope="module")
def trained(base: Path, tmp_path_factory) -> Path:
    """Manifests, encoder and LLM on top of ``base``."""
    out = _copy_base(base, tmp_path_factory.mktemp("trained"), "tokenizer", "image-generator", "audio-generator")
    MF.write_manifests(out, SMOKE.stages.n_captions, SMOKE.stages.n_dialogues, SMOKE.stages.seed)
    ENC.train_encoder(out, SMOKE.encoder, _log(out, "encoder"), _control())
    LLM.train_llm(out, SMOKE.llm, _log(out, "llm"), _control())
    return out


def test_manifests_are_what_training_reads(tmp_path: Path):
    from anymodal.encoders import ImageBindEncoder
    from anymodal.training.data import load_manifest, requirements

    data = MF.write_manifests(tmp_path, 3, 12, seed=1)
    all_m = list(Modality.parse(m) for m in ("image", "audio", "video"))
    for name, stage in (("captions.jsonl", 1), ("captions.jsonl", 2), ("dialogues.jsonl", 3),
                        ("heldout-captions.jsonl", 1), ("heldout-dialogues.jsonl", 3)):
        man = load_manifest(data / name, requirements(stage, all_m, all_m, denoise=stage == 2))
        assert not man.bad and man.total == len(man.records) > 0, (name, man.bad[:2])
    rows = [json.loads(x) for x in (data / "captions.jsonl").read_text().splitlines()]
    assert sorted({r["modality"] for r in rows}) == ["audio", "image", "video"] and len(rows) == 9
    assert all(not world.is_held_out(world.spec_from_dict(r["spec"])) for r in rows)
    held = [json.loads(x) for x in (data / "heldout-captions.jsonl").read_text().splitlines()]
    assert all(world.is_held_out(world.spec_from_dict(r["spec"])) for r in held)
    # the files decode through the encoder's own preprocess
    enc = ImageBindEncoder.from_config(SMOKE.encoder.options, all_m)
    for r in rows[::3]:
        m = Modality.parse(r["modality"])
        x = enc.preprocess(m, [str(data / r["media"])])
        assert enc(m, x).shape == (1, 1, 16)
    # a second call with the same settings keeps the files; other settings rebuild
    stamp = (data / "captions.jsonl").stat().st_mtime_ns
    MF.write_manifests(tmp_path, 3, 12, seed=1)
    assert (data / "captions.jsonl").stat().st_mtime_ns == stamp
    MF.write_manifests(tmp_path, 2, 12, seed=1)
    assert len((data / "captions.jsonl").read_text().splitlines()) == 6
    # filtering for a model that reads images only and generates audio only
    only = MF.filter_manifest(data / "dialogues.jsonl", data / "f.jsonl", [Modality.IMAGE], [Modality.AUDIO])
    for row in map(json.loads, only.read_text().splitlines()):
        for msg in row["messages"]:
            keys = {k for item in msg["content"] if isinstance(item, dict) for k in item if k != "caption"}
            assert keys <= ({"image"} if msg["role"] == "user" else {"audio"})


def test_encoder_resumes_bit_identically_and_loads_from_its_safetensors(base: Path, tmp_path: Path):
    from anymodal.encoders import ImageBindEncoder

    full = _copy_base(base, tmp_path / "full", "tokenizer")
    path = ENC.train_encoder(full, SMOKE.encoder, _log(full, "encoder"), _control())
    part = _copy_base(base, tmp_path / "part", "tokenizer")
    with pytest.raises(L.Stop):
        ENC.train_encoder(part, SMOKE.encoder, _log(part, "encoder"), _control(stop_at_step=1))
    with pytest.raises(ValueError, match="steps differ"):
        ENC.train_encoder(part, R.EncoderPhase(**{**SMOKE.encoder.__dict__, "steps": 9}), _log(part, "encoder"),
                         _control())
    ENC.train_encoder(part, SMOKE.encoder, _log(part, "encoder"), _control())
    a, b = _weights(path), _weights(part / "encoder")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    figures = json.loads((full / "state" / "encoder" / "figures.json").read_text())["heldout"]
    assert set(figures) == {"image", "audio", "video"}
    assert set(figures["audio"]) == {"note", "waveform", "duration"}
    assert all(0.0 <= v["probe"] <= 1.0 for fields in figures.values() for v in fields.values())
    # the EncoderConfig route the toy config uses: options + the safetensors file, strictly
    meta = json.loads((path / "config.json").read_text())
    enc = ImageBindEncoder.from_config(meta["options"], meta["modalities"], str(path / "model.safetensors"))
    ref = ImageBindEncoder.from_pretrained(path)
    x = ref.preprocess(Modality.IMAGE, [world.render(world.sample_specs("image", 1, 0)[0])])
    assert torch.equal(enc(Modality.IMAGE, x), ref(Modality.IMAGE, x))


def test_encoder_can_learn_shape_off_the_palette_only(base: Path, tmp_path: Path):
    from dataclasses import replace

    with pytest.raises(ValueError, match="shape_off_palette_only needs augmented renders"):
        R.EncoderPhase(shape_off_palette_only=True, augment_fraction=0.0)
    cfg = replace(SMOKE.encoder, shape_off_palette_only=True)
    assert cfg.augment_fraction > 0
    plain = _copy_base(base, tmp_path / "plain", "tokenizer")
    masked = _copy_base(base, tmp_path / "masked", "tokenizer")
    a = _weights(ENC.train_encoder(plain, SMOKE.encoder, _log(plain, "encoder"), _control()))
    b = _weights(ENC.train_encoder(masked, cfg, _log(masked, "encoder"), _control()))
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)  # the shape losses differ
    assert json.loads((masked / "state" / "encoder" / "config.json").read_text())["shape_off_palette_only"] is True


def test_llm_resumes_bit_identically_and_saves_with_its_tokenizer(base: Path, trained: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from anymodal.processor import AnyModalProcessor

    alone = _copy_base(base, tmp_path / "alone", "tokenizer")
    with pytest.raises(ValueError, match="run the encoder phase"):  # media are in the loop: the encoder comes first
        LLM.train_llm(alone, SMOKE.llm, _log(alone, "llm"), _control())
    full = _copy_base(base, tmp_path / "full", "tokenizer")
    shutil.copytree(trained / "encoder", full / "encoder")
    path = LLM.train_llm(full, SMOKE.llm, _log(full, "llm"), _control())
    part = _copy_base(base, tmp_path / "part", "tokenizer")
    shutil.copytree(trained / "encoder", part / "encoder")
    with pytest.raises(L.Stop):
        LLM.train_llm(part, SMOKE.llm, _log(part, "llm"), _control(stop_at_step=1))
    LLM.train_llm(part, SMOKE.llm, _log(part, "llm"), _control())
    a, b = _weights(path), _weights(part / "llm")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {f"{m}.safetensors" for m in ("image", "audio", "video")} <= {k.split("/")[0] for k in a}

    lm = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert lm.config.model_type == "llama" and lm.get_input_embeddings().weight.shape[0] == len(tok)
    before = len(tok)
    AnyModalProcessor(tok, {Modality.IMAGE: 4, Modality.AUDIO: 8, Modality.VIDEO: 24},
                      {m: LLM.MEDIA_TOKENS for m in (Modality.IMAGE, Modality.AUDIO, Modality.VIDEO)})
    assert len(tok) == before  # every anymodal token is already in the LLM's vocabulary
    ids = tok("### Human: <image><image>\ndescribe this image\n### Assistant: a red circle</s>",
              add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids and len(ids) == 11
    figures = json.loads((full / "state" / "llm" / "figures.json").read_text())
    assert set(figures["heldout"]) == set(LLM.TEXT_TASKS) | set(LLM.MEDIA_DIRECTIONS)
    data = torch.load(full / "state" / "llm" / "data.pt", weights_only=True)
    assert data["dropped"] == 0 and set(data["feats"]) == {"image", "audio", "video"}
    for m, rows in data["rows"].items():  # every medium's positions are in its row: embed() checks the count
        pid = LLM.llm_tokenizer(full)[1].placeholder_ids[Modality.parse(m)]
        counts = (data["ids"] == pid).sum(1)
        assert torch.equal(counts, torch.bincount(rows, minlength=len(counts)) * LLM.MEDIA_TOKENS)


def test_llm_can_pretrain_on_sessions_and_reworded_asks(base: Path, trained: Path, tmp_path: Path):
    from dataclasses import replace

    with pytest.raises(ValueError, match="fractions summing to at most 1"):
        replace(SMOKE.llm, rephrased=0.6, sessions=0.6)
    with pytest.raises(ValueError, match=r"stages\.rephrased and stages\.sessions are fractions"):  # before any phase runs
        T.ToyworldTrainConfig.preset("default").with_overrides(["stages.sessions=0.9"])
    cfg = replace(SMOKE.llm, rephrased=0.3, sessions=0.5, max_length=224)
    out = _copy_base(base, tmp_path / "sessions", "tokenizer")
    shutil.copytree(trained / "encoder", out / "encoder")
    LLM.train_llm(out, cfg, _log(out, "llm"), _control())
    data = torch.load(out / "state" / "llm" / "data.pt", weights_only=True)
    tok, proc = LLM.llm_tokenizer(out)
    turns = (data["ids"] == tok.eos_token_id).sum(1)  # EOS closes every assistant turn
    assert int((turns >= 3).sum()) >= 10  # sessions of 3-5 turns are in the data, not cut away
    assert data["dropped"] <= len(data["ids"]) // 20
    for m, rows in data["rows"].items():  # every medium's positions are still in its row
        counts = (data["ids"] == proc.placeholder_ids[Modality.parse(m)]).sum(1)
        assert torch.equal(counts, torch.bincount(rows, minlength=len(counts)) * LLM.MEDIA_TOKENS)
    assert json.loads((out / "state" / "llm" / "config.json").read_text())["sessions"] == 0.5


def test_build_toy_config_reads_the_generators_and_skips_a_missing_one(trained: Path, tmp_path: Path):
    from anymodal.pipeline import AnyModalPipeline

    cfg = ST.build_toy_config(trained, SMOKE)
    assert set(cfg.generators) == {Modality.IMAGE, Modality.AUDIO}
    assert cfg.output_projectors[Modality.IMAGE].targets == {"prompt_embeds": [24, 16]}  # smoke CLIP width
    assert cfg.output_projectors[Modality.AUDIO].targets == {"prompt_embeds": [1, 16]}  # smoke CLAP projection
    assert cfg.encoders["imagebind"].pretrained.endswith("encoder/model.safetensors")
    AnyModalPipeline.from_config(cfg)  # generator shapes are checked against the projectors at load
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("llm", "encoder", "image-generator"):
        (partial / name).symlink_to(trained / name)
    only = ST.build_toy_config(partial, SMOKE)
    assert set(only.generators) == {Modality.IMAGE} and set(only.output_projectors) == {Modality.IMAGE}


def test_stages_resume_load_answer_evaluate_and_ship(trained: Path, tmp_path: Path):
    from anymodal.pipeline import AnyModalPipeline
    from anymodal.toyworld.evaluate import evaluate

    out = _copy_base(trained, tmp_path / "run", "tokenizer", "image-generator", "audio-generator", "encoder", "llm",
                     "data")
    with pytest.raises(L.Stop, match="stage 1"):
        ST.run_stages(out, SMOKE, _log(out, "stages"), _control(stop_at_step=1))
    assert (out / "stages" / "stage1" / "checkpoints").is_dir() and not (out / "final").exists()
    final = ST.run_stages(out, SMOKE, _log(out, "stages"), _control())
    assert final == out / "final"
    metrics = [json.loads(x) for x in (out / "stages" / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]  # resumed at step 1, not restarted
    # stage 1 started from the input projectors the llm phase trained together with the LLM
    start = _weights(out / "stages" / "stage0" / "input_projectors")
    assert start and all(torch.equal(v, _weights(out / "llm" / "input_projectors")[k]) for k, v in start.items())

    pipe = AnyModalPipeline.from_pretrained(final)
    assert set(pipe.generators) == {Modality.IMAGE, Modality.AUDIO}
    res = pipe("draw a red circle", seed=0, progress=False)
    assert isinstance(res.text[0], str)
    image = world.render(world.sample_specs("image", 1, 3)[0])
    res = pipe("what colour is the shape?", images=image, seed=0, progress=False)
    assert isinstance(res.text[0], str)
    results = evaluate(pipe, n=2, progress=False)
    assert set(results) == {"t2i", "t2a", "t2v", "i2t", "a2t", "v2t"} and all(r.n == 2 for r in results.values())

    # shipping copies every component; a model over the limit is refused and nothing is written
    with pytest.raises(ValueError, match=r"MB \(\d+ bytes\), over the limit"):
        SH.ship(out, tmp_path / "ship", limit_bytes=1000)
    assert not (tmp_path / "ship").exists()
    shipped = SH.ship(out, tmp_path / "ship")
    index = json.loads((shipped / "anymodal_index.json").read_text())
    assert all(e["kind"] == "saved" for e in index["components"]["generators"].values())
    assert index["components"]["llm"]["kind"] == "full"
    assert index["components"]["encoders"]["imagebind"]["kind"] == "saved"
    assert str(trained) not in (shipped / "anymodal_index.json").read_text()  # no run paths recorded
    again = AnyModalPipeline.from_pretrained(shipped)
    a, b = again("draw a red circle", seed=0, progress=False), pipe("draw a red circle", seed=0, progress=False)
    assert a.token_ids == b.token_ids


def test_stage2_denoising_weight_reaches_stage2_only():
    st = R.StagesPhase(stage2_denoise_weight=0.5, denoise_modalities=("image", "video"))
    two = ST.stage_training_config(2, st, progress=False)
    assert (two.denoise_weight, two.denoise_modalities) == (0.5, ["image", "video"])
    assert all(ST.stage_training_config(s, st, progress=False).denoise_weight == 0 for s in (1, 3))
    default = ST.stage_training_config(2, R.StagesPhase(), progress=False)
    assert (default.denoise_weight, default.denoise_modalities) == (4.0, ["video"])
    off = ST.stage_training_config(2, R.StagesPhase(stage2_denoise_weight=0.0), progress=False)
    assert (off.denoise_weight, off.denoise_modalities) == (0.0, None)
    # a toy model without a video generator (the smoke tests' image + audio) trains stage 2 without it
    no_video = ST.stage_training_config(2, R.StagesPhase(), progress=False, outputs=[Modality.IMAGE, Modality.AUDIO])
    assert (no_video.denoise_weight, no_video.denoise_modalities) == (0.0, None)
    both = ST.stage_training_config(2, st, progress=False, outputs=[Modality.IMAGE, Modality.AUDIO])
    assert (both.denoise_weight, both.denoise_modalities) == (0.5, ["image"])
    with pytest.raises(ValueError, match="image and/or video"):
        R.StagesPhase(denoise_modalities=("audio",))


def test_tune_continues_stage_3_of_a_saved_pipeline(tmp_path):
    """`anymodal toyworld tune` on the shipped default: reworded, session and copy rows in its manifest,
    only the LoRA and the input projectors trained, and a merged pipeline that loads and answers."""
    import json

    from anymodal import AnyModalPipeline
    from anymodal.cli import main

    out = tmp_path / "tune"
    assert main(["toyworld", "tune", "--out", str(out), "--steps", "2", "--dialogues", "40", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "data" / "dialogues.jsonl").read_text().splitlines()]
    tasks = {r["task"] for r in rows}
    assert {"session", "copy"} <= tasks and any(len(r["messages"]) >= 6 for r in rows)
    trained = (out / "stage3" / "training_config.yaml").read_text()
    assert "lora" in trained and "input_projectors" in trained and "output_projectors" not in trained
    tuned, shipped = AnyModalPipeline.from_pretrained(out / "final"), AnyModalPipeline.from_pretrained()
    before = dict(shipped.model.output_projectors.state_dict())
    assert all(torch.equal(v, before[k]) for k, v in tuned.model.output_projectors.state_dict().items())
    llm = shipped.model.language_model.state_dict()
    assert any(not torch.equal(v, llm[k]) for k, v in tuned.model.language_model.state_dict().items())  # LoRA merged
    assert main(["toyworld", "tune", "--from", str(tmp_path), "--out", str(out / "x")]) == 2


def test_no_progress_silences_the_data_bars(tmp_path: Path, capfd):
    """``toyworld train --no-progress`` reaches the manifests' and the LLM phase's media bars."""
    from anymodal.encoders import ImageBindEncoder

    MF.write_manifests(tmp_path / "a", 2, 4, seed=3, progress=False)
    enc = ImageBindEncoder.from_config(SMOKE.encoder.options, [Modality.IMAGE])
    g = np.random.default_rng(0)
    feats = LLM._encode_specs(enc, world.sample_specs(Modality.IMAGE, 3, g, "train"), g, progress=False)
    assert feats[Modality.IMAGE].shape[0] == 3
    err = capfd.readouterr().err
    assert "manifests" not in err and "llm media" not in err, err
    MF.write_manifests(tmp_path / "b", 2, 4, seed=3)  # on by default, so the check above can fail
    LLM._encode_specs(enc, world.sample_specs(Modality.IMAGE, 3, g, "train"), g)
    err = capfd.readouterr().err
    assert "manifests" in err and "llm media" in err
