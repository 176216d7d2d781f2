"""The ``stages`` phase: anymodal's three training stages on the toy world's components.

:func:`build_toy_config` assembles the ``AnyModalConfig`` over the encoder, the LLM and the
generators of ``out``; :func:`run_stages` trains stages 1, 2 and 3 (``out/stages/stage<N>``),
merges the LoRA and saves the pipeline to ``out/final``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import AnyModalConfig, GeneratorConfig, InputProjectorConfig, LLMConfig, OutputProjectorConfig
from ..modality import Modality
from .llm import (CAPTION_PROMPT, GENERATION_PROMPT, GENERATION_RESPONSE, INPUT_PROJECTORS, encoder_config,
                  input_projector_config)
from .loop import JsonlLog, RunControl, Stop, atomic_dir
from .manifests import filter_manifest, write_manifests
from .recipe import ModelPhasesConfig, StagesPhase


def _generator_config(modality: Modality, directory: Path, settings: dict[str, Any]) -> GeneratorConfig:
    kind = {Modality.IMAGE: "stable-diffusion", Modality.AUDIO: "audioldm", Modality.VIDEO: "text-to-video"}[modality]
    return GeneratorConfig(type=kind, pretrained=str(directory), settings=dict(settings))


def build_toy_config(out: str | os.PathLike, cfg: ModelPhasesConfig | None = None) -> AnyModalConfig:
    """The anymodal config of the toy model: the trained LLM (``out/llm``, with its tokenizer), the
    trained ImageBind (``out/encoder/model.safetensors`` with its options; image, audio, video), an
    input projector per modality, and the generators of ``out/image-generator`` and
    ``out/audio-generator`` where those phases have run (output projector targets read from each
    generator's ``conditioning_shapes``). Paths are absolute."""
    import anymodal.generators  # noqa: F401  (registers the adapters)

    from ..registry import GENERATORS

    out = Path(out).resolve()
    cfg = cfg or ModelPhasesConfig()
    st = cfg.stages
    for need in ("llm", "encoder"):
        if not (out / need).is_dir():
            raise ValueError(f"no {need} in {out}; run train_{need} first")
    encoder = encoder_config(out)
    inputs = {m: input_projector_config(st.projector_hidden) for m in encoder.modalities}
    pretrained = out / "llm" / INPUT_PROJECTORS / "config.json"
    if st.carry_input_projectors and pretrained.is_file():  # the shapes the llm phase trained them at
        inputs = {Modality.parse(m): InputProjectorConfig(**c) for m, c in json.loads(pretrained.read_text()).items()}
    generators: dict[Modality, GeneratorConfig] = {}
    outputs: dict[Modality, OutputProjectorConfig] = {}
    settings = {Modality.IMAGE: st.image_settings, Modality.AUDIO: st.audio_settings,
                Modality.VIDEO: st.video_settings}
    for m, name in ((Modality.IMAGE, "image-generator"), (Modality.AUDIO, "audio-generator"),
                    (Modality.VIDEO, "video-generator")):
        directory = out / name
        if not (directory / "model_index.json").is_file():
            continue
        g = _generator_config(m, directory, settings[m])
        shapes = GENERATORS.get(g.type).from_config(replace(g, lazy=True)).conditioning_shapes
        generators[m] = g
        outputs[m] = OutputProjectorConfig(type="transformer", targets={k: list(v) for k, v in shapes.items()},
                                           hidden_dim=st.projector_hidden, num_layers=st.output_layers,
                                           num_heads=4 if st.projector_hidden % 4 == 0 else 1,
                                           hidden_layer=st.output_hidden_layers.get(m.value, -1))
    llm = LLMConfig(model=str(out / "llm"), tokenizer=str(out / "llm"), max_new_tokens=st.max_new_tokens)
    return AnyModalConfig(llm=llm, name="toyworld", encoders={"imagebind": encoder}, input_projectors=inputs,
                          output_projectors=outputs, generators=generators)


def stage_training_config(stage: int, cfg: StagesPhase, progress: bool = True,
                          outputs: Sequence[Modality] | None = None) -> Any:
    """anymodal.training settings of ``stage``; ``outputs``: the generators the toy model has (the
    denoising loss covers those of ``cfg.denoise_modalities`` among them; None: all of them)."""
    from ..config import LoraConfig
    from ..training import TrainingConfig

    steps = (cfg.stage1_steps, cfg.stage2_steps, cfg.stage3_steps)[stage - 1]
    have = None if outputs is None else {Modality.parse(m).value for m in outputs}
    denoised = [m for m in cfg.denoise_modalities if have is None or m in have]
    denoise = cfg.stage2_denoise_weight if stage == 2 and denoised else 0.0
    return TrainingConfig(stage=stage, seed=cfg.seed, batch_size=cfg.batch_size, learning_rate=cfg.lr[stage - 1],
                          denoise_weight=denoise, denoise_modalities=denoised if denoise > 0 else None,
                          lr_scheduler="cosine", warmup_steps=min(cfg.warmup_steps, steps // 5), max_steps=steps,
                          max_bad_fraction=0.01, caption_prompt=CAPTION_PROMPT, generation_prompt=GENERATION_PROMPT,
                          generation_response=GENERATION_RESPONSE, save_every=cfg.save_every, keep_checkpoints=1,
                          log_every=1, progress=progress,
                          lora=LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=0.0,
                                          target_modules=list(cfg.lora_targets)))


def _pretrained_start(out: Path, config: AnyModalConfig, seed: int) -> Path:
    """``out/stages/stage0``: the toy pipeline with the llm phase's input projectors loaded (what
    stage 1 starts from; the LLM and encoder are referenced, the output projectors fresh)."""
    from safetensors.torch import load_model

    from ..pipeline import INDEX_NAME, AnyModalPipeline

    start = out / "stages" / "stage0"
    if not (start / INDEX_NAME).is_file():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pipe = AnyModalPipeline.from_config(config)
        for m, proj in pipe.model.input_projectors.items():
            load_model(proj, str(out / "llm" / INPUT_PROJECTORS / f"{m}.safetensors"))
        pipe.save_pretrained(start)
    return start


def run_stages(out: Path, cfg: ModelPhasesConfig, log: JsonlLog, control: RunControl) -> Path:
    """Run anymodal stages 1, 2 and 3 on the toy components and save ``out/final``.

    The manifests come from :func:`write_manifests` (``cfg.stages`` sizes), filtered to what the
    model reads and generates. Each stage runs in ``out/stages/stage<N>`` and resumes from its last
    checkpoint; a finished stage (its ``final/`` exists) is skipped. ``control``'s deadline stops a
    stage at its next checkpoint (raising :class:`~anymodal.toyworld.loop.Stop`). Stage 1 starts from
    ``out/stages/stage0``, the pipeline with the llm phase's input projectors (unless
    ``carry_input_projectors`` is off or the llm phase saved none). Stage 3's LoRA is merged into the
    LLM, and the merged pipeline is saved to ``out/final``.
    """
    from ..training import train as train_stage

    out = Path(out)
    st = cfg.stages
    config = build_toy_config(out, cfg)
    data = write_manifests(out, st.n_captions, st.n_dialogues, st.seed, st.rephrased, st.sessions, st.copies,
                           progress=control.progress)
    inputs, outputs = list(config.input_projectors), list(config.generators)
    if not outputs:
        raise ValueError(f"no generator in {out} (image-generator, audio-generator): run a generator phase first")
    manifests = {1: filter_manifest(data / "captions.jsonl", data / "stage1-captions.jsonl", inputs, [], "input"),
                 2: filter_manifest(data / "captions.jsonl", data / "stage2-captions.jsonl", [], outputs, "output"),
                 3: filter_manifest(data / "dialogues.jsonl", data / "stage3-dialogues.jsonl", inputs, outputs)}
    (out / "stages").mkdir(parents=True, exist_ok=True)
    source = str(out / "stages" / "toy-config.yaml")  # anymodal.training reads a model from a file or directory
    config.to_yaml(source)
    if st.carry_input_projectors and (out / "llm" / INPUT_PROJECTORS / "config.json").is_file():
        source = str(_pretrained_start(out, config, st.seed))
    for stage in (1, 2, 3):
        run_dir = out / "stages" / f"stage{stage}"
        final = run_dir / "final"
        if not (final / "anymodal_index.json").is_file():
            tcfg = stage_training_config(stage, st, control.progress, outputs)

            def on_step(step: int, metrics: dict[str, float], every: int = st.save_every, total: int = tcfg.max_steps
                        ) -> None:
                if step % every == 0 and step < total and control.should_stop(step):
                    raise Stop(f"stage {stage}: stopped at step {step}/{total} (checkpointed); rerun to resume")

            t0 = time.time()
            # accelerate places the stage: on the CPU when asked, else on the current GPU (train() set it)
            result = train_stage(source, manifests[stage], run_dir, tcfg, resume=True, on_step=on_step,
                                 device="cpu" if torch.device(control.device).type == "cpu" else None)
            log.write(stage=f"stage{stage}", event="done", device=result.device, steps=result.steps, samples=result.samples,
                      last_loss=result.losses[-1] if result.losses else None, bad_rows=result.bad_rows,
                      samples_per_s=round(result.samples_per_s, 2), seconds=round(time.time() - t0, 1))
        source = str(final)
    return _merge_and_save(out / "stages" / "stage3", out / "final")


def _merge_and_save(stage3: Path, final: Path) -> Path:
    """Fold stage 3's LoRA (``stage3/final``) into the LLM once (``stage3/merged``, kept for a rerun) and
    save the merged pipeline to ``final``."""
    from ..pipeline import AnyModalPipeline
    from ..training import merge_lora

    merged = stage3 / "merged"
    if not (merged / "anymodal_index.json").is_file():
        atomic_dir(merged, lambda d: (shutil.rmtree(d), merge_lora(stage3 / "final", d)))
    return AnyModalPipeline.from_pretrained(merged).save_pretrained(final)


# What `toyworld tune` trains: the LoRA and the input projectors. The output projectors and the signal
# tokens' rows stay as stages 2 and 3 left them: trained on (with stage 2's video denoising loss), a first
# tune that trained them too lost held-out t2i 47% -> 37% and t2v 100% -> 90% (n = 100) while it taught
# rewordings and sessions (docs/toyworld.md, "Reworded requests and sessions").
TUNE_TRAINABLE = ("lora", "input_projectors")


def tune_dialogues(start: str | os.PathLike, out: str | os.PathLike, cfg: StagesPhase | None = None,
                   steps: int = 1500, n_dialogues: int = 4000, progress: bool = True, lr: float = 5e-4,
                   trainable: Sequence[str] = TUNE_TRAINABLE) -> Path:
    """Continue stage 3 from a finished pipeline (``start``: a saved directory, e.g. the shipped
    default) on dialogues with ``cfg``'s shares of other wordings and multi-turn sessions, with a
    fresh LoRA, and save the merged pipeline to ``out/final``.

    This is stage 3 again with only its data changed, for a build whose generators and encoder are
    already good: the full recipe (``toyworld train``) draws the same mix for its own stage 3
    (``StagesPhase.rephrased`` / ``sessions``). Resumable: rerun with the same arguments."""
    from ..pipeline import INDEX_NAME
    from ..training import train as train_stage

    out = Path(out)
    cfg = replace(cfg or StagesPhase(), stage3_steps=steps)
    if not 0 <= cfg.rephrased + cfg.sessions <= 1:
        raise ValueError(f"rephrased + sessions must be at most 1, got {cfg.rephrased} + {cfg.sessions}")
    if not (Path(start) / INDEX_NAME).is_file():
        raise ValueError(f"toyworld tune: {start} is not a saved pipeline directory (no {INDEX_NAME})")
    # what it reads and makes, from its config alone: training loads the weights once, below
    pipe_config = AnyModalConfig.from_yaml(Path(start) / "config.yaml")
    inputs, outputs = list(pipe_config.input_projectors), list(pipe_config.generators)
    data = write_manifests(out, 1, n_dialogues, cfg.seed + 100, cfg.rephrased, cfg.sessions, cfg.copies,
                           progress=progress)
    manifest = filter_manifest(data / "dialogues.jsonl", data / "tune-dialogues.jsonl", inputs, outputs)
    run_dir = out / "stage3"
    if not (run_dir / "final" / "anymodal_index.json").is_file():
        tcfg = replace(stage_training_config(3, cfg, progress, outputs), trainable=list(trainable), learning_rate=lr)
        train_stage(str(start), manifest, run_dir, tcfg, resume=True, device="cpu")
    return _merge_and_save(run_dir, out / "final")
