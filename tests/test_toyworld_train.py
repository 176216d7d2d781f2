"""``anymodal toyworld train``: every phase runs a few steps of the smoke preset, resumes bit-identically,
and the image generator it saves loads through diffusers and through anymodal's adapter."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from anymodal.toyworld import audio_generator as AG
from anymodal.toyworld import loop as L
from anymodal.toyworld import recipe as R
from anymodal.toyworld import train as T
from anymodal.toyworld import world

torch.set_num_threads(1)


def _smoke(**image_overrides) -> T.ToyworldTrainConfig:
    cfg = T.ToyworldTrainConfig.preset("smoke")
    return replace(cfg, image_generator=replace(cfg.image_generator, **image_overrides))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    T.train(out, phases=["tokenizer"], config="smoke", results_dir=None, progress=False)
    return out


def _with_tokenizer(tokenizer_dir: Path, out: Path) -> Path:
    import shutil

    shutil.copytree(tokenizer_dir / "tokenizer", out / "tokenizer")
    shutil.copytree(tokenizer_dir / "state" / "tokenizer", out / "state" / "tokenizer")
    return out


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(directory.rglob("*.safetensors")):
        for k, v in load_file(f).items():
            out[f"{f.parent.name}/{k}"] = v
    return out


def test_tokenizer_covers_the_world(tokenizer_dir: Path):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer_dir / "tokenizer"))
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["[PAD]", "[UNK]", "<s>", "</s>"]
    g = np.random.default_rng(123)  # dialogues the tokenizer never saw
    texts = [t for _ in range(200) for _, t in world.sample_dialogue(g, "heldout", render_media=False).texts()]
    ids = tok(texts)["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)
    assert all(row[0] == tok.bos_token_id and row[-1] == tok.eos_token_id for row in ids)
    assert tok.decode(tok("Draw a RED circle?")["input_ids"], skip_special_tokens=True) == "draw a red circle?"
    assert tok("a zebra")["input_ids"][2] == tok.unk_token_id


IMAGE = ["image-vae", "image-generator"]


def test_image_generator_resumes_bit_identically(tokenizer_dir: Path, tmp_path: Path):
    cfg = _smoke(vae_steps=2, steps=4, checkpoint_every=2, final_eval_prompts=1)
    full = _with_tokenizer(tokenizer_dir, tmp_path / "full")
    results = T.train(full, phases=IMAGE, config=cfg, results_dir=tmp_path / "results", progress=False)
    assert [r.status for r in results] == ["done", "done"]
    reference = _weights(full / "image-generator")
    # the image generator is assembled with the image-vae phase's VAE, byte for byte
    assert (full / "image-vae" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (full / "image-generator" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    for stop, stopped in ((1, "image-vae"), (3, "image-generator")):  # off a checkpoint boundary; the UNet loop
        part = _with_tokenizer(tokenizer_dir, tmp_path / f"stop{stop}")
        results = T.train(part, phases=IMAGE, config=cfg, results_dir=None, progress=False, stop_at_step=stop)
        assert results[-1].phase == stopped and results[-1].status == "stopped" and "--resume" in results[-1].message
        with pytest.raises(ValueError, match="--resume"):
            T.train(part, phases=[stopped], config=cfg, results_dir=None, progress=False)
        with pytest.raises(ValueError, match="steps differ"):
            T.train(part, phases=[stopped], config=cfg, results_dir=None, progress=False, resume=True,
                    overrides=["image_generator.steps=6"])
        results = T.train(part, phases=IMAGE, config=cfg, results_dir=None, progress=False, resume=True)
        assert results[-1].status == "done"
        resumed = _weights(part / "image-generator")
        assert resumed.keys() == reference.keys()
        assert all(torch.equal(resumed[k], reference[k]) for k in reference), f"stop at {stop} changed weights"
        for phase, n in (("image-vae", cfg.image_generator.vae_steps), ("image-generator", cfg.image_generator.steps)):
            log = L.JsonlLog(part / "logs" / f"{phase}.jsonl").records()
            steps = [(r["stage"], r["step"]) for r in log if "loss" in r]
            assert len(steps) == len(set(steps)) == n, phase
    # finished phases are skipped; nothing temporary is left behind
    results = T.train(full, phases=IMAGE, config=cfg, results_dir=None, progress=False, resume=True)
    assert [r.status for r in results] == ["skipped", "skipped"]
    assert not [p for p in full.rglob("*") if ".tmp-" in p.name or p.name.endswith((".tmp", ".old")) or ".old-" in p.name]
    summary = json.loads((tmp_path / "results" / "toyworld-image-generator.json").read_text())
    assert set(summary["figures"]) == {"seen", "heldout"}
    assert {"colour_ok", "shape_ok", "ok", "n"} <= set(summary["figures"]["heldout"])


def test_image_vae_phase_needs_nothing_and_exports_an_older_runs_vae(tokenizer_dir: Path, tmp_path: Path):
    """A run made before the image-vae phase existed has its VAE inside image-generator/: the phase
    exports that one instead of training another, so the run's video phase can resume."""
    cfg = _smoke(vae_steps=2, steps=2, checkpoint_every=2, final_eval_prompts=1)
    with pytest.raises(ValueError, match=r"image-generator needs the 'image-vae' phase.*--phase image-vae\)"):
        T.train(_with_tokenizer(tokenizer_dir, tmp_path / "none"), phases=["image-generator"], config=cfg,
                results_dir=None, progress=False)
    out = tmp_path / "older"
    out.mkdir()
    [r] = T.train(out, phases=["image-vae"], config=cfg, results_dir=None, progress=False)  # no tokenizer needed
    assert r.status == "done"
    vae = out / "image-vae" / "diffusion_pytorch_model.safetensors"
    older = tmp_path / "older2"
    (older / "image-generator").mkdir(parents=True)
    import shutil

    shutil.copytree(out / "image-vae", older / "image-generator" / "vae")
    [r] = T.train(older, phases=["image-vae"], config=cfg, results_dir=None, progress=False)
    assert r.status == "done" and (older / "image-vae" / vae.name).read_bytes() == vae.read_bytes()
    assert not (older / "state" / "image-vae" / "vae.ckpt").exists()  # exported, not trained
    assert any(rec.get("event") == "exported" for rec in L.JsonlLog(older / "logs" / "image-vae.jsonl").records())


def test_image_generator_loads_through_diffusers_and_the_adapter(tokenizer_dir: Path, tmp_path: Path):
    from diffusers import StableDiffusionPipeline

    import anymodal.generators  # noqa: F401
    from anymodal.config import GeneratorConfig
    from anymodal.registry import GENERATORS

    out = _with_tokenizer(tokenizer_dir, tmp_path / "run")
    r = T.train(out, phases=IMAGE, config=_smoke(final_eval_prompts=1), results_dir=None, progress=False)[-1]
    directory = Path(r.path)
    pipe = StableDiffusionPipeline.from_pretrained(str(directory), safety_checker=None, feature_extractor=None)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    from transformers import PreTrainedTokenizerFast  # transformers 5 saves it as its alias TokenizersBackend

    assert isinstance(pipe.tokenizer, PreTrainedTokenizerFast) and len(pipe.tokenizer) < 200  # word level
    gen = GENERATORS.get("stable-diffusion").from_config(
        GeneratorConfig(type="stable-diffusion", pretrained=str(directory)))
    assert gen.conditioning_shapes == {"prompt_embeds": (24, 16)}
    cond = gen.encode_text(["a red circle on a blue background"])
    [image] = gen.render(cond, settings={"num_inference_steps": 2, "guidance_scale": 3.0},
                         rng=torch.Generator().manual_seed(0))
    assert image.size == (64, 64)
    lazy = GENERATORS.get("stable-diffusion").from_config(
        GeneratorConfig(type="stable-diffusion", pretrained=str(directory), lazy=True))
    assert lazy.conditioning_shapes == {"prompt_embeds": (24, 16)} and not lazy.is_loaded


def test_cli_and_errors(tmp_path: Path, capsys):
    from anymodal.cli import main

    out = tmp_path / "cli"
    assert main(["toyworld", "train", "--out", str(out), "--preset", "smoke", "--phase", "tokenizer",
                 "--no-progress", "--threads", "1"]) == 0
    assert "tokenizer: done" in capsys.readouterr().out
    assert main(["toyworld", "train", "--out", str(out), "--preset", "smoke", "--phase", "tokenizer"]) == 0
    assert "already done" in capsys.readouterr().out
    empty = tmp_path / "empty"
    assert main(["toyworld", "train", "--out", str(empty), "--preset", "smoke", "--phase", "image-generator",
                 "--no-progress"]) == 2
    assert "run the 'tokenizer' phase first" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown phase"):
        T.train(out, phases=["hologram-generator"], config="smoke")
    with pytest.raises(ValueError, match="unknown preset"):
        T.ToyworldTrainConfig.preset("huge")
    with pytest.raises(ValueError, match="caption_dropout"):
        R.ImageGeneratorPhase(caption_dropout=1.5)
    smoke = T.ToyworldTrainConfig.preset("smoke")
    changed = smoke.with_overrides(["image_generator.steps=7", "image_generator.lr=2e-3", "tokenizer.seed=1"])
    assert (changed.image_generator.steps, changed.image_generator.lr, changed.tokenizer.seed) == (7, 2e-3, 1)
    for bad, match in [("image_generator.steps", "section.field=value"), ("vae.steps=3", "unknown section"),
                       ("image_generator.stepz=3", "no field 'stepz'"), ("image_generator.steps=abc", "takes a int"),
                       ("image_generator.steps=0", "positive")]:
        with pytest.raises(ValueError, match=match):
            smoke.with_overrides([bad])


def test_device_is_checked_before_anything_runs(tmp_path: Path, capsys):
    from anymodal.cli import main

    assert L.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert L.resolve_device(None) == L.resolve_device("auto") and L.resolve_device("cpu") == "cpu"
    for bad, match in [("gpu", "unknown device 'gpu'; expected cpu, cuda, cuda:N or auto"),
                       ("meta", "device 'meta' is not supported here; expected cpu, cuda"),
                       ("mps", "device 'mps' is not supported here")]:
        with pytest.raises(ValueError, match=match):
            L.resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA GPU on this machine"):
            L.resolve_device("cuda:0")
    else:
        with pytest.raises(ValueError, match="numbered from 0"):
            L.resolve_device(f"cuda:{torch.cuda.device_count()}")
    out = tmp_path / "dev"
    assert main(["toyworld", "train", "--out", str(out), "--preset", "smoke", "--phase", "tokenizer",
                 "--no-progress", "--device", "gpu"]) == 2
    assert "unknown device 'gpu'" in capsys.readouterr().err
    assert not out.exists()  # refused before any phase started


def test_cosine_lr_and_atomic_dir(tmp_path: Path):
    assert L.cosine_lr(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert L.cosine_lr(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert L.cosine_lr(100, 100, 1.0, 10) == pytest.approx(0.0)
    target = tmp_path / "d"
    L.atomic_dir(target, lambda d: (d / "a.txt").write_text("1"))

    def fail(d: Path) -> None:
        (d / "a.txt").write_text("2")
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        L.atomic_dir(target, fail)
    assert (target / "a.txt").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_griffin_lim_vocoder_keeps_pitch_and_round_trips(tmp_path: Path):
    from anymodal.generators.vocoders import GriffinLimVocoder
    from anymodal.toyworld import checkers

    voc = GriffinLimVocoder(**R.AudioGeneratorPhase().vocoder)
    specs = [world.AudioSpec("C4", "sine", "long"), world.AudioSpec("A5", "sawtooth", "short")]
    real = torch.from_numpy(np.stack([world.render(s, np.random.default_rng(i)) for i, s in enumerate(specs)]))
    features = AG.log_mel_features(real)
    assert features.shape == (2, R.MEL_FRAMES, R.MEL_BANDS)
    waves = voc(features)
    assert waves.shape == (2, world.CLIP_SAMPLES)
    assert all(checkers.score_audio(w.numpy(), world.SAMPLE_RATE, s)["ok"] for w, s in zip(waves, specs))
    # the world's level, not sum(window) = 512 times it (every saved WAV used to be a clipped square wave)
    peak = float(real.abs().max())
    assert 0.5 * peak < float(waves.abs().max()) < 2.0 * peak
    # the pitch between FFT bins: C4 (261.6 Hz) came back on the 250 Hz bin, which reads as B3
    c4 = checkers.read_audio(waves[0].numpy())
    assert abs(1200 * np.log2(c4.f0 / specs[0].frequency)) < 35 and c4.note == "C4"
    assert GriffinLimVocoder(sub_bins=1)(features[:1]).abs().max() < 2.0 * peak  # plain NNLS: scaled too
    voc.save_pretrained(str(tmp_path / "voc"))
    again = GriffinLimVocoder.from_pretrained(str(tmp_path / "voc"))
    assert torch.equal(again(features[:1]), waves[:1])  # deterministic phase initialisation
    with pytest.raises(ValueError, match="expected features of shape"):
        voc(torch.zeros(2, 64, 32))


def test_vocoder_bounds_a_too_loud_mel_by_a_gain_not_by_clipping():
    """A generated mel louder than the world's (the shipped A4 sine peaked at 2-2.8) comes out at the
    vocoder's peak_limit, the same waveform scaled: no clipped or saturated samples."""
    from anymodal.generators.vocoders import GriffinLimVocoder
    from anymodal.toyworld import checkers

    spec = world.AudioSpec("A4", "sine", "long")
    real = torch.from_numpy(world.render(spec, np.random.default_rng(0)))[None]
    loud = AG.log_mel_features(real * 6.0)  # six times the world's level: a peak near 3
    unlimited = GriffinLimVocoder(peak_limit=None)(loud)[0].numpy()
    assert np.abs(unlimited).max() > 2.0
    limited = GriffinLimVocoder()(loud)[0].numpy()
    assert np.abs(limited).max() == pytest.approx(0.99, abs=1e-6)
    assert np.allclose(limited, unlimited * (0.99 / np.abs(unlimited).max()), atol=1e-6)
    assert checkers.score_audio(limited, world.SAMPLE_RATE, spec)["ok"]
    quiet = AG.log_mel_features(real)
    assert torch.equal(GriffinLimVocoder()(quiet), GriffinLimVocoder(peak_limit=None)(quiet))  # under it: untouched
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match="peak_limit must be in"):
            GriffinLimVocoder(peak_limit=bad)


def test_vocoder_nnls_recomputes_a_wrong_scipy_answer(monkeypatch):
    """scipy 1.17's nnls once gave 2.3e7 on three bins for a real C6 sine's frame (the clip peaked at 8e5).
    Whatever nnls returns, the vocoder's solution must fit at least as well as zero, and be non-negative."""
    from scipy import optimize

    from anymodal.generators import vocoders

    voc = vocoders.GriffinLimVocoder(**R.AudioGeneratorPhase().vocoder)
    fb = voc.mel_basis.double().numpy()
    rng = np.random.default_rng(0)
    target = fb @ np.where(rng.random(fb.shape[1]) < 0.02, rng.random(fb.shape[1]), 0.0)
    good = vocoders.nnls(fb, target)
    assert good.min() >= 0 and np.linalg.norm(fb @ good - target) < 1e-3 * np.linalg.norm(target)
    real_nnls = optimize.nnls

    def wrong(a, b, *args, **kwargs):  # what scipy returned on that frame: huge weights far from the fit
        x, _ = real_nnls(a, b, *args, **kwargs)
        x = x.copy()
        x[-30:] = 2.3e7
        return x, float(np.linalg.norm(a @ x - b))

    monkeypatch.setattr(optimize, "nnls", wrong)
    fixed = vocoders.nnls(fb, target)
    assert np.allclose(fb @ fixed, target, atol=1e-6 * np.abs(target).max()) and fixed.max() < 10 * good.max()
    spec = world.AudioSpec("C6", "sine", "long")
    real = torch.from_numpy(world.render(spec, np.random.default_rng(6)))[None]
    wave = voc(AG.log_mel_features(real))[0]
    assert float(wave.abs().max()) < 2.0 * float(real.abs().max())  # the world's level, every frame wrong or not


@pytest.mark.parametrize("module", ["anymodal.generators.vocoders", "anymodal.toyworld.vocoder"])
def test_the_audio_adapter_imports_the_vocoder_it_loads(tmp_path: Path, module: str):
    """diffusers loads a component of another library only once its module is imported: the audioldm
    adapter does that itself, in a fresh interpreter too, for the vocoder's current module (the
    shipped default's) and for the name that pipelines saved before it moved record."""
    import shutil
    import subprocess
    import sys

    from anymodal.pipeline import default_model_path

    shipped = Path(default_model_path()) / "generators" / "audio"
    assert json.loads((shipped / "model_index.json").read_text())["vocoder"] == [
        "anymodal.generators.vocoders", "GriffinLimVocoder"]
    audio = tmp_path / "audio"
    shutil.copytree(shipped, audio)
    index = json.loads((audio / "model_index.json").read_text())
    index["vocoder"] = [module, "GriffinLimVocoder"]
    (audio / "model_index.json").write_text(json.dumps(index))
    script = ("import sys; from anymodal.config import GeneratorConfig; from anymodal.registry import GENERATORS; "
              "import anymodal.generators; "
              "assert 'anymodal.generators.vocoders' not in sys.modules; "
              f"config = GeneratorConfig(type='audioldm', pretrained={str(audio)!r}); "
              "gen = GENERATORS.get('audioldm').from_config(config); "
              "print(type(gen.pipeline.vocoder).__module__)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "anymodal.generators.vocoders"


def test_audio_generator_resumes_and_loads_through_the_adapter(tokenizer_dir: Path, tmp_path: Path):
    import anymodal.generators  # noqa: F401
    from anymodal.config import GeneratorConfig
    from anymodal.registry import GENERATORS

    cfg = T.ToyworldTrainConfig.preset("smoke")
    cfg = replace(cfg, audio_generator=replace(cfg.audio_generator, vae_steps=2, final_eval_prompts=1,
                                               text_aux_weight=0.1))  # the auxiliary head is checkpointed too
    out = _with_tokenizer(tokenizer_dir, tmp_path / "audio")
    [r] = T.train(out, phases=["audio-generator"], config=cfg, results_dir=None, progress=False, stop_at_step=3)
    assert r.status == "stopped"
    [r] = T.train(out, phases=["audio-generator"], config=cfg, results_dir=None, progress=False, resume=True)
    assert r.status == "done" and set(r.figures) == {"seen", "heldout"}
    assert {"note_ok", "waveform_ok", "duration_ok"} <= set(r.figures["seen"])
    # stopped and resumed == uninterrupted, although the CLAP text encoder's dropout draws from
    # torch's global generator (train_loop seeds it per step)
    whole = _with_tokenizer(tokenizer_dir, tmp_path / "audio-whole")
    [w] = T.train(whole, phases=["audio-generator"], config=cfg, results_dir=None, progress=False)
    for rel in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (Path(w.path) / rel).read_bytes() == (Path(r.path) / rel).read_bytes(), rel
    assert json.loads((Path(r.path) / "model_index.json").read_text())["vocoder"] == [
        "anymodal.generators.vocoders", "GriffinLimVocoder"]
    gen = GENERATORS.get("audioldm").from_config(GeneratorConfig(type="audioldm", pretrained=r.path))
    assert type(gen.pipeline.vocoder).__name__ == "GriffinLimVocoder"
    assert gen.conditioning_shapes == {"prompt_embeds": (1, 16)}
    [audio] = gen.render(gen.encode_text(["a high sine tone of A5 lasting half a second"]),
                         settings={"num_inference_steps": 2, "guidance_scale": 3.0, "audio_length_s": 1.024},
                         rng=torch.Generator().manual_seed(0))
    assert audio.sample_rate == world.SAMPLE_RATE and audio.array.shape == (world.CLIP_SAMPLES,)


def test_train_writes_results_beside_the_run_not_into_the_repository(tmp_path, monkeypatch):
    """`toyworld train --preset smoke` used to overwrite the committed bench/results/toyworld-*.json."""
    from anymodal.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench" / "results").mkdir(parents=True)
    assert main(["toyworld", "train", "--out", str(tmp_path / "run"), "--preset", "smoke", "--phase", "tokenizer",
                 "--phase", "image-vae", "--phase", "image-generator", "--no-progress"]) == 0
    assert not any((tmp_path / "bench" / "results").iterdir())
    assert (tmp_path / "run" / "results" / "toyworld-image-generator.json").is_file()
