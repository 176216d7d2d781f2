"""The training loop, under accelerate.

One function, :func:`train`, runs any stage: it loads the pipeline and the manifest, fills the
alignment-target cache, freezes what the stage does not train, and steps an AdamW optimiser
with an LR schedule. It checkpoints with ``accelerator.save_state`` (written to a temporary
directory and renamed into place), resumes from the latest checkpoint, and finally saves the
pipeline with ``save_pretrained`` (safetensors, plus the LoRA adapter in stage 3).

Determinism: the data order comes from a seedable sampler (seed + epoch), and torch's RNG is
re-seeded from (seed, micro-batch index, process) before each micro-batch, so a run killed and
resumed draws exactly the same dropout and noise as one that was never interrupted.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from anymodal.config import AnyModalConfig
from anymodal.modality import Modality
from anymodal.utils import atomic_write_text

from .config import TrainingConfig
from .data import (Collator, DialogueRecord, ManifestDataset, MediaRef, SampleBuilder, TargetCache,
                   generator_identity, load_manifest, requirements)
from .losses import ImageDenoiser, ImageForVAE, VideoDenoiser, VideoForVAE
from .stages import setup_stage

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_NAME = "trainer_state.json"
SCHEDULER_NAME = "scheduler.json"
METRICS_NAME = "metrics.jsonl"
FINAL = "final"


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    final_dir: Path | None
    steps: int
    samples: int
    losses: list[float] = field(default_factory=list)  # mean loss of each optimiser step (this session)
    samples_per_s: float = 0.0  # this session, all processes together
    bad_rows: int = 0
    pipeline: Any = None
    device: str = "cpu"  # where accelerate placed this run (this process's device)


@dataclass
class _State:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    micro: int = 0  # micro-batches consumed in total (seeds the RNG)
    samples: int = 0
    bad_lines: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "micro": self.micro,
                "samples": self.samples, "bad_lines": sorted(self.bad_lines)}


@dataclass
class _Run:
    """One run's settings and prepared objects, shared by the steps of :func:`train`."""

    tcfg: TrainingConfig
    out: Path
    accelerator: Any
    log_with: str | None
    manifest: Any
    module: Any
    optimizer: Any
    loader: Any
    scheduler: Any
    params: list[torch.nn.Parameter]
    total_steps: int
    loss_names: list[str]
    on_step: Callable[[int, dict[str, float]], None] | None

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


@dataclass
class _Tally:
    """What the loop accumulates: the current optimiser step's micro-batches and this session's totals."""

    progress: Any
    result: TrainResult
    bad_lines: set[int]
    session_samples: int = 0
    session_start: float = field(default_factory=time.perf_counter)
    step_losses: list[dict[str, torch.Tensor]] = field(default_factory=list)
    step_samples: int = 0
    last_time: float = field(default_factory=time.perf_counter)


def train(config: str | os.PathLike | AnyModalConfig, data: str | os.PathLike, out: str | os.PathLike,
          training: TrainingConfig | str | os.PathLike | None = None, *, stage: int | None = None,
          max_steps: int | None = None, resume: bool = False, device: str | None = None,
          on_step: Callable[[int, dict[str, float]], None] | None = None, **overrides: Any) -> TrainResult:
    """Train one stage and save the result under ``out/final``.

    Args:
        config: the model: a YAML config, a shipped config name, or a saved pipeline directory
            (for example the ``final`` directory of the previous stage).
        data: a JSONL manifest (caption pairs for stages 1-2, dialogues for stage 3).
        out: the run directory: ``checkpoints/``, ``metrics.jsonl``, ``final/``.
        training: a :class:`TrainingConfig` or a YAML file; ``stage``, ``max_steps`` and
            ``overrides`` (any TrainingConfig field) replace its values.
        resume: continue from the latest checkpoint in ``out/checkpoints`` (a fresh start when
            there is none). Without it, a run directory that already has checkpoints is refused.
        device: ``"cpu"`` forces CPU; ``"cuda"`` (or ``"cuda:N"``: that GPU in a single process) trains on
            GPUs; ``None`` lets accelerate choose (GPU when present). The CLI's ``--device`` defaults to cpu.
        on_step: called after every optimiser step (and checkpoint) with the step and its metrics.
    """
    tcfg = _training_config(training, stage=stage, max_steps=max_steps, **overrides)
    out = Path(out)
    accelerator, log_with = _accelerator(tcfg, out, device)
    latest = _prepare_run_dir(out, tcfg, resume, accelerator.is_main_process)  # 1. resume bookkeeping
    pipe = _stage_pipeline(config, tcfg)  # 2. the pipeline
    manifest, loader, denoisers = _data(pipe, tcfg, data, out, accelerator)  # 3. data
    run = _prepare(pipe, tcfg, out, accelerator, log_with, manifest, loader, denoisers, on_step)  # 4. optimiser
    state = _start(run, latest if resume else None)
    tally = _loop(run, state)  # 5. the loop
    final = _save_final(accelerator, run.module, pipe, config, tcfg, out)  # 6. save the trained pipeline
    if log_with:
        accelerator.end_training()
    elapsed = time.perf_counter() - tally.session_start
    result = tally.result
    result.final_dir, result.steps, result.samples = final, state.step, state.samples
    result.samples_per_s = tally.session_samples / elapsed if elapsed > 0 else 0.0
    result.bad_rows = len(manifest.bad) + len(tally.bad_lines)
    result.pipeline = pipe
    return result


def _stage_pipeline(config: str | os.PathLike | AnyModalConfig, tcfg: TrainingConfig) -> Any:
    """The pipeline to train. Random inits depend on the seed, so a resumed run rebuilds the same frozen weights."""
    from accelerate.utils import set_seed

    from anymodal.pipeline import AnyModalPipeline

    set_seed(tcfg.seed)
    return AnyModalPipeline.from_pretrained(config)


def _prepare(pipe: Any, tcfg: TrainingConfig, out: Path, accelerator: Any, log_with: str | None, manifest: Any,
             loader: Any, denoisers: dict, on_step: Callable[[int, dict[str, float]], None] | None) -> _Run:
    """What trains, its optimiser and LR schedule, all prepared by accelerate."""
    from transformers import get_scheduler

    outputs = list(pipe.generators)
    module = setup_stage(pipe, tcfg, denoisers)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tcfg.learning_rate, betas=tuple(tcfg.adam_betas),
                                  weight_decay=tcfg.weight_decay)
    module, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    steps_per_epoch = max(1, math.ceil(len(loader) / tcfg.gradient_accumulation_steps))
    total_steps = tcfg.max_steps or tcfg.num_epochs * steps_per_epoch
    # Not passed through prepare(): accelerate would step it once per process per step.
    scheduler = get_scheduler(tcfg.lr_scheduler, optimizer, num_warmup_steps=tcfg.warmup_steps,
                              num_training_steps=total_steps)
    # The scheduler is checkpointed by anymodal as JSON (accelerate would pickle it, and unpickle it
    # with weights_only=False on resume).
    accelerator.register_save_state_pre_hook(_only_trainable)
    loss_names = ["loss", "ce"] + [f"{kind}/{m.value}" for kind in ("align", "denoise") for m in outputs]
    return _Run(tcfg, out, accelerator, log_with, manifest, module, optimizer, loader, scheduler, params,
                total_steps, loss_names, on_step)


def _start(run: _Run, latest: Path | None) -> _State:
    """The loop's starting state: fresh, or restored from ``latest``; logs what the run will do."""
    tcfg = run.tcfg
    state = _State()
    if latest is not None:
        load_checkpoint(run.accelerator, latest, run.scheduler)
        state = _State(**json.loads((latest / STATE_NAME).read_text()))
        if run.main:
            logger.info("resumed from %s (step %d)", latest, state.step)
    if run.main:
        _trim_metrics(run.out / METRICS_NAME, state.step)
        logger.info("stage %d: %d trainable parameters (%s); %d rows (%d bad); %d steps on %d process(es)",
                    tcfg.stage, sum(p.numel() for p in run.params), ", ".join(tcfg.trainable or []),
                    run.manifest.total, len(run.manifest.bad), run.total_steps, run.accelerator.num_processes)
    if run.log_with:
        run.accelerator.init_trackers(f"anymodal-stage{tcfg.stage}", config=tcfg.to_dict())
    return state


def _loop(run: _Run, state: _State) -> _Tally:
    """Step the optimiser until ``total_steps``, epoch after epoch, from wherever ``state`` stands."""
    tally = _Tally(progress=_progress(run.main and run.tcfg.progress, run.total_steps, state.step, run.tcfg.stage),
                   result=TrainResult(run.out, None, state.step, state.samples, device=str(run.accelerator.device)),
                   bad_lines=set(state.bad_lines))
    while state.step < run.total_steps:
        for batch in _epoch_batches(run, state):
            _micro_step(run, state, tally, batch)
            if not run.accelerator.sync_gradients:
                continue
            _optimiser_step(run, state, tally)
            if state.step >= run.total_steps:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
    if tally.progress is not None:
        tally.progress.close()
    return tally


def _epoch_batches(run: _Run, state: _State) -> Any:
    """The current epoch's loader, past the micro-batches a resumed run already consumed."""
    run.loader.set_epoch(state.epoch)
    if not state.batch_in_epoch:
        return run.loader
    rest = run.accelerator.skip_first_batches(run.loader, state.batch_in_epoch)
    rest.set_epoch(state.epoch)
    return rest


def _micro_step(run: _Run, state: _State, tally: _Tally, batch: Any) -> None:
    """Forward and backward one micro-batch; the optimiser steps when accelerate syncs the gradients."""
    accelerator = run.accelerator
    state.batch_in_epoch += 1
    state.micro += 1
    torch.manual_seed((run.tcfg.seed * 1_000_003 + state.micro) * 4099 + accelerator.process_index)
    _note_bad_rows(run, tally.bad_lines, batch.bad)
    with accelerator.accumulate(run.module):
        losses = run.module(batch)
        accelerator.backward(losses["loss"])
        if accelerator.sync_gradients and run.tcfg.max_grad_norm is not None:
            accelerator.clip_grad_norm_(run.params, run.tcfg.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    if batch.size:  # an all-bad batch steps with a zero loss (processes stay in step) but is not logged
        tally.step_losses.append({k: v.detach() for k, v in losses.items()})
    tally.step_samples += batch.size


def _note_bad_rows(run: _Run, bad_lines: set[int], bad: list) -> None:
    """Warn once about each row no process could read, and fail the run past ``max_bad_fraction``."""
    new_bad = _gather_bad(run.accelerator, bad)
    if not new_bad:
        return
    fresh = [b for b in new_bad if b.line not in bad_lines]
    bad_lines.update(b.line for b in new_bad)
    if run.main:
        for b in fresh:
            logger.warning("%s:%d: %s; row skipped", run.manifest.path, b.line, b.reason)
    run.manifest.check(run.tcfg.max_bad_fraction, runtime_bad=len(bad_lines))


def _optimiser_step(run: _Run, state: _State, tally: _Tally) -> None:
    """After an optimiser step: the schedule, the step's metrics and logs, a checkpoint when due, ``on_step``."""
    tcfg = run.tcfg
    run.scheduler.step()
    state.step += 1
    metrics, n = _reduce(run.accelerator, tally.step_losses, run.loss_names, tally.step_samples)
    now = time.perf_counter()
    state.samples += n
    tally.session_samples += n
    metrics.update(step=state.step, epoch=state.epoch, lr=run.scheduler.get_last_lr()[0], samples=state.samples,
                   samples_per_s=n / max(now - tally.last_time, 1e-9),
                   bad_rows=len(run.manifest.bad) + len(tally.bad_lines))
    tally.last_time = now
    tally.step_losses, tally.step_samples = [], 0
    tally.result.losses.append(metrics.get("loss", float("nan")))
    if run.main and state.step % tcfg.log_every == 0:
        _append_metrics(run.out / METRICS_NAME, metrics)
    if run.log_with:
        run.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, float)}, step=state.step)
    if tally.progress is not None:
        tally.progress.update(1)
        tally.progress.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}",
                                   samples_s=f"{metrics['samples_per_s']:.1f}")
    if tcfg.save_every and state.step % tcfg.save_every == 0 and state.step < run.total_steps:
        state.bad_lines = sorted(tally.bad_lines)
        save_checkpoint(run.accelerator, run.out, state, tcfg.keep_checkpoints, run.scheduler)
    if run.on_step is not None:
        run.on_step(state.step, metrics)


def _accelerator(tcfg: TrainingConfig, out: Path, device: str | None) -> tuple[Any, str | None]:
    """The run's Accelerator (CPU when asked or forced by ACCELERATE_USE_CPU) and its tracker name."""
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs

    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if tcfg.mixed_precision != "no" and (device == "cpu" or forced_cpu or not torch.cuda.is_available()):
        raise ValueError(f"training.mixed_precision={tcfg.mixed_precision!r} needs a GPU; use 'no' on CPU "
                         "(bf16 matmuls on CPU are hundreds of times slower than fp32)")
    log_with = None
    if tcfg.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ValueError("training.tensorboard needs the tensorboard package (pip install tensorboard)") from None
        log_with = "tensorboard"
    _release_other_device_state(cpu=device == "cpu" or forced_cpu)
    if device is not None and device.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        torch.cuda.set_device(torch.device(device))  # accelerate's single-process "cuda" is the current GPU
    accelerator = Accelerator(
        gradient_accumulation_steps=tcfg.gradient_accumulation_steps, mixed_precision=tcfg.mixed_precision,
        cpu=device == "cpu", log_with=log_with, project_dir=str(out),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=tcfg.seed),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    return accelerator, log_with


def _prepare_run_dir(out: Path, tcfg: TrainingConfig, resume: bool, main: bool) -> Path | None:
    """The checkpoint to resume from (None: a fresh start); refuses to start over existing checkpoints."""
    latest = latest_checkpoint(out)
    if latest is not None and not resume:
        raise ValueError(f"{out} already holds checkpoints ({latest.name}); pass --resume to continue, "
                         "or choose a new --out")
    if resume and latest is None and main:
        logger.info("no checkpoint in %s; starting from scratch", out / CHECKPOINTS)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        _check_same_run(out, tcfg, resume and latest is not None)
        atomic_write_text(out / "training_config.yaml", tcfg.to_yaml())
    return latest


def _data(pipe: Any, tcfg: TrainingConfig, data: str | os.PathLike, out: Path, accelerator: Any
          ) -> tuple[Any, Any, dict]:
    """The manifest, its data loader (alignment targets cached first) and the denoisers the loss needs."""
    model = pipe.model
    inputs = list(model.input_projectors.keys())
    outputs = list(pipe.generators)
    from_media = [m for m in outputs if pipe.generators[m].targets_from == "media"] if tcfg.align_weight > 0 else []
    req = requirements(tcfg.stage, [Modality(m) for m in inputs], outputs, denoise=tcfg.denoise_weight > 0,
                       media_targets=from_media)
    manifest = load_manifest(data, req, log=accelerator.is_main_process)  # every process reads it; one reports it
    manifest.check(tcfg.max_bad_fraction)
    wanted = _output_targets(manifest.records, captions_are_outputs=tcfg.stage == 2, from_media=set(from_media))
    targets = None
    if tcfg.align_weight > 0 and wanted:
        targets = _fill_target_cache(accelerator, pipe, wanted, Path(tcfg.target_cache or out / "target_cache"))
    denoisers, denoise_fns = _denoisers(pipe, tcfg, set(_output_modalities(manifest.records, tcfg.stage == 2)),
                                        accelerator.device)
    preprocess = {m: model.encoder_for(m).preprocess for m in map(Modality, inputs)}
    max_length = (tcfg.max_length or pipe.config.llm.max_length
                  or getattr(model.llm_config, "max_position_embeddings", None))
    builder = SampleBuilder(tcfg.stage, pipe.processor, preprocess, tcfg.caption_prompt, tcfg.generation_prompt,
                            tcfg.generation_response, targets, denoise_fns, max_length)
    loader = torch.utils.data.DataLoader(
        ManifestDataset(manifest.records, builder), batch_size=tcfg.batch_size, shuffle=True,
        num_workers=tcfg.num_workers, collate_fn=Collator(pipe.processor.tokenizer.pad_token_id, tcfg.padding_side),
        generator=torch.Generator().manual_seed(tcfg.seed), persistent_workers=False)
    return manifest, loader, denoisers


def _save_final(accelerator: Any, module: Any, pipe: Any, config: Any, tcfg: TrainingConfig, out: Path) -> Path:
    """Save the trained pipeline to ``out/final`` (from a gathered state dict when processes hold shards)."""
    main = accelerator.is_main_process
    accelerator.wait_for_everyone()
    final = out / FINAL
    if _sharded(accelerator):
        # Each process holds a shard: gather a full state dict and save through a rebuilt pipeline.
        full = accelerator.get_state_dict(module)
        if main:
            save_from_state_dict(config, tcfg, full, final)
    else:
        stage_module = accelerator.unwrap_model(module)
        if stage_module.signal_delta is not None:
            stage_module.signal_delta.fold()
            stage_module.signal_delta = None
        pipe.model.eval()
        if main:
            pipe.save_pretrained(final)
    if main:
        logger.info("saved the trained pipeline to %s", final)
    accelerator.wait_for_everyone()
    return final


# ============================================================================ helpers
def _sharded(accelerator: Any) -> bool:
    from accelerate import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def save_from_state_dict(config: str | os.PathLike | AnyModalConfig, tcfg: TrainingConfig,
                         state: dict[str, torch.Tensor], final: Path) -> Path:
    """Rebuild the stage's model from ``config``, load a full training state dict into it, save it.

    This is how a sharded run (FSDP, DeepSpeed ZeRO) saves: no process holds the whole model,
    so rank 0 gathers the state dict (``accelerator.get_state_dict``) and writes it through a
    fresh copy of the pipeline set up exactly as the stage set up its own.
    """
    from accelerate.utils import set_seed

    from anymodal.pipeline import AnyModalPipeline

    set_seed(tcfg.seed)
    pipe = AnyModalPipeline.from_pretrained(config)
    stage = setup_stage(pipe, tcfg)
    own = stage.state_dict()
    missing = [n for n, p in stage.named_parameters() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"the gathered state dict lacks trained parameters, e.g. {missing[0]!r}")
    stage.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    if stage.signal_delta is not None:
        stage.signal_delta.fold()
    pipe.model.eval()
    return pipe.save_pretrained(final)


def _training_config(training: TrainingConfig | str | os.PathLike | None, stage: int | None,
                     max_steps: int | None, **overrides: Any) -> TrainingConfig:
    """The run's settings: ``training`` with ``overrides`` applied (``stage``/``max_steps`` only when given)."""
    if stage is not None:
        overrides["stage"] = stage
    if max_steps is not None:
        overrides["max_steps"] = max_steps
    if isinstance(training, TrainingConfig):
        if "stage" in overrides and overrides["stage"] != training.stage and "trainable" not in overrides:
            overrides["trainable"] = None  # the new stage's defaults, not the old stage's groups
        return TrainingConfig.from_dict({**training.to_dict(), **overrides}) if overrides else training
    if training is None:
        return TrainingConfig.from_dict(overrides)
    return TrainingConfig.from_yaml(training, **overrides)


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run (incomplete ones are temporary directories, never listed)."""
    d = Path(out) / CHECKPOINTS
    if not d.is_dir():
        return None
    done = sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE_NAME).is_file())
    return done[-1] if done else None


def save_checkpoint(accelerator: Any, out: Path, state: _State, keep: int, scheduler: Any = None) -> Path:
    """``save_state`` into a temporary directory, then rename it into place (all processes take part).

    The LR scheduler's state goes to ``scheduler.json``; nothing in a checkpoint needs unpickling
    beyond what ``torch.load(weights_only=True)`` reads (optimizer tensors, RNG states).
    """
    d = out / CHECKPOINTS
    final = d / f"step-{state.step:08d}"
    tmp = d / f".step-{state.step:08d}.tmp"
    if accelerator.is_main_process:
        d.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if scheduler is not None:
            atomic_write_text(tmp / SCHEDULER_NAME, json.dumps(scheduler.state_dict()))
        atomic_write_text(tmp / STATE_NAME, json.dumps(state.to_json(), indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        old = sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step-"))
        for p in old[:-keep]:
            shutil.rmtree(p)
    accelerator.wait_for_everyone()
    return final


# What accelerate's save_state and anymodal write into a checkpoint; a resume refuses anything else.
_CHECKPOINT_FILES = re.compile(r"(model(_\d+)?\.safetensors|optimizer(_\d+)?\.bin|random_states_\d+\.pkl|"
                               r"scaler\.pt|sampler(_\d+)?\.bin|dl_state_dict(_\d+)?\.bin|"
                               r"custom_checkpoint_0\.pkl|"
                               + re.escape(STATE_NAME) + "|" + re.escape(SCHEDULER_NAME) + ")")


def check_checkpoint(path: Path) -> None:
    """Refuse a checkpoint directory holding files anymodal does not write, before anything in it is read.

    Pickled files that accelerate writes (optimizer state, RNG states) are read with
    ``torch.load(weights_only=True)``; a file that needs more than that is refused, not run.
    """
    path = Path(path)
    for f in sorted(path.iterdir()):
        if f.is_dir() or not _CHECKPOINT_FILES.fullmatch(f.name):
            raise ValueError(f"checkpoint {path} holds {f.name!r}, which anymodal does not write; refusing to resume "
                             "from it (remove the file if you trust it, or choose another --out)")
    if (path / "custom_checkpoint_0.pkl").exists() and (path / SCHEDULER_NAME).exists():
        raise ValueError(f"checkpoint {path} holds both {SCHEDULER_NAME} and custom_checkpoint_0.pkl; anymodal writes "
                         "only the first; refusing to resume from it")
    for f in sorted(path.glob("*.pkl")) + sorted(path.glob("*.bin")):
        _safe_load(f)  # each once, before accelerate reads it: a bad file fails here, with its name


def _safe_load(path: Path) -> Any:
    from accelerate.utils import load as accelerate_load  # weights_only=True plus numpy's RNG-state types

    try:
        return accelerate_load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler fails in many ways on a damaged or hostile file; none is trusted
        first = (str(e).splitlines() or [""])[0]
        raise ValueError(f"checkpoint file {path} cannot be read safely (anymodal loads checkpoint tensors with "
                         f"torch.load(weights_only=True) only): {type(e).__name__}: {first}") from None


def load_checkpoint(accelerator: Any, path: Path, scheduler: Any) -> None:
    """Resume state from a checkpoint written by :func:`save_checkpoint`, refusing anything else."""
    check_checkpoint(path)
    for name in (STATE_NAME,):
        if not (path / name).is_file():
            raise ValueError(f"checkpoint {path} has no {name}")
    accelerator.load_state(str(path), strict=False, load_kwargs={"weights_only": True})
    if (path / SCHEDULER_NAME).is_file():
        try:
            sched = json.loads((path / SCHEDULER_NAME).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"checkpoint file {path / SCHEDULER_NAME} is not valid JSON: {e}") from None
    elif (path / "custom_checkpoint_0.pkl").is_file():  # the scheduler as accelerate's custom-state pickle
        sched = _safe_load(path / "custom_checkpoint_0.pkl")
    else:
        raise ValueError(f"checkpoint {path} has no {SCHEDULER_NAME}")
    if not isinstance(sched, dict):
        raise ValueError(f"checkpoint {path}: the scheduler state must be a mapping, got {type(sched).__name__}")
    scheduler.load_state_dict(sched)


def _only_trainable(models: list, weights: list, output_dir: str) -> None:
    """Checkpoints hold the trained parameters only; frozen ones are rebuilt from the model source."""
    for i, model in enumerate(models):
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        if i < len(weights):
            weights[i] = {k: v for k, v in weights[i].items() if k in keep}


def _check_same_run(out: Path, tcfg: TrainingConfig, resuming: bool) -> None:
    if not resuming or not (out / "training_config.yaml").is_file():
        return
    old = TrainingConfig.from_yaml(out / "training_config.yaml")
    for name in ("stage", "trainable", "seed", "batch_size", "gradient_accumulation_steps"):
        if getattr(old, name) != getattr(tcfg, name):
            raise ValueError(f"--resume: training.{name} was {getattr(old, name)!r} in {out}, now "
                             f"{getattr(tcfg, name)!r}; resume with the same settings or choose a new --out")


def _outputs(records: list, captions_are_outputs: bool) -> list[MediaRef]:
    """Every medium to generate in the data (caption pairs of stage 2, assistant media of dialogues)."""
    from .data import CaptionRecord

    out: list[MediaRef] = []
    for r in records:
        if isinstance(r, CaptionRecord) and captions_are_outputs:
            out.append(MediaRef(r.modality, r.path, r.caption))
        elif isinstance(r, DialogueRecord):
            out += [p for t in r.turns if t.role == "assistant" for p in t.parts if isinstance(p, MediaRef)]
    return out


def _output_modalities(records: list, captions_are_outputs: bool) -> list[Modality]:
    return sorted({ref.modality for ref in _outputs(records, captions_are_outputs)}, key=lambda m: m.value)


def _output_targets(records: list, captions_are_outputs: bool, from_media: set[Modality]
                    ) -> dict[Modality, list[str | Path]]:
    """What the alignment targets are computed from, by modality: each output's caption, or its file
    for the modalities in ``from_media`` (generators whose ``targets_from`` is ``"media"``)."""
    out: dict[Modality, list[str | Path]] = {}
    for ref in _outputs(records, captions_are_outputs):
        source = ref.path if ref.modality in from_media else ref.caption
        if source:
            out.setdefault(ref.modality, []).append(source)
    return out


def _release_other_device_state(cpu: bool) -> None:
    """accelerate keeps one process-wide state, fixed by the first ``Accelerator``: a later run in the
    same process that wants the other device would silently keep the first one (a GPU asked for, the
    CPU kept) or fail (the CPU asked for after a GPU run). In a single, unlaunched process such a
    run gets a fresh state; a launched multi-process run keeps the launcher's."""
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    if not PartialState._shared_state:
        return
    state = PartialState()
    if state.distributed_type != DistributedType.NO or state.num_processes > 1:
        return
    if cpu:
        want = "cpu"
    elif torch.cuda.is_available():
        want = "cuda"
    else:
        want = "mps" if torch.backends.mps.is_available() else "cpu"
    if state.device.type != want:
        logger.info("accelerate ran on %s earlier in this process; starting a fresh state on %s", state.device, want)
        AcceleratorState._reset_state(reset_partial_state=True)


def _fill_target_cache(accelerator: Any, pipe: Any, sources: dict[Modality, list[str | Path]], directory: Path
                       ) -> TargetCache:
    """Targets from captions (``encode_text``) or, for generators whose ``targets_from`` is ``"media"``,
    from the target files (``encode_media``)."""
    identities = {}
    for m in sources:
        gen = pipe.generators[m]
        if not gen.config.cpu_offload:  # an offloaded pipeline places its models itself
            gen.to(accelerator.device)
        identities[m] = generator_identity(m, gen)
    media = [m for m in sources if pipe.generators[m].targets_from == "media"]
    cache = TargetCache(directory, identities, media)
    with accelerator.main_process_first():  # the main process computes; the others then find every entry
        for m, items in sources.items():
            gen = pipe.generators[m]
            if m in media:
                n, failed = cache.fill_media(m, items, gen.encode_media)
                if accelerator.is_main_process:
                    for reason in failed:
                        logger.warning("no %s alignment target: %s; its rows will be skipped", m.value, reason)
            else:
                n = cache.fill(m, items, gen.encode_text)
            if n and accelerator.is_main_process:
                logger.info("cached %d %s alignment targets (from %s) in %s", n, m.value,
                            "media" if m in media else "captions", directory / identities[m])
    return cache


def _denoisers(pipe: Any, tcfg: TrainingConfig, modalities: set[Modality], device: Any
               ) -> tuple[dict[Modality, ImageDenoiser], dict[Modality, Callable]]:
    """The frozen generators' denoising losses, and the loaders of their target media, for the output
    modalities in the data (or those ``denoise_modalities`` names)."""
    if tcfg.denoise_weight <= 0:
        return {}, {}
    if not modalities:
        raise ValueError("training.denoise_weight > 0, but the data has no media to generate")
    chosen = modalities if tcfg.denoise_modalities is None else {Modality(m) for m in tcfg.denoise_modalities}
    missing = chosen - modalities
    if missing:
        raise ValueError(f"training.denoise_modalities names {', '.join(sorted(m.value for m in missing))}, "
                         f"but the data generates only {', '.join(sorted(m.value for m in modalities))}")
    denoisers, fns = {}, {}
    for m in sorted(chosen, key=lambda x: x.value):
        gen = pipe.generators[m]
        dpipe = gen.pipeline
        latent = all(hasattr(dpipe, a) for a in ("unet", "vae", "scheduler"))
        if latent and not gen.config.cpu_offload:
            gen.to(device)  # the UNet's conditioning may use the generator's other parts (unCLIP: its text encoder)
        if m is Modality.IMAGE and latent:
            d = ImageDenoiser(dpipe.unet, dpipe.vae, dpipe.scheduler, unet_inputs=gen.unet_conditioning)
            denoisers[m], fns[m] = d, ImageForVAE(d.image_size)
        elif m is Modality.VIDEO and latent:
            settings = gen.make_settings()  # what it generates; no size set: the pipeline's default
            d = VideoDenoiser(dpipe.unet, dpipe.vae, dpipe.scheduler, unet_inputs=gen.unet_conditioning)
            denoisers[m], fns[m] = d, VideoForVAE(settings.num_frames, settings.height or d.image_size,
                                                  settings.width or d.image_size)
        else:
            raise ValueError(f"training.denoise_weight: the denoising loss supports image and video generators "
                             f"with a UNet and a VAE; {m.value} uses {gen.config.type!r} (list the modalities "
                             f"to denoise in training.denoise_modalities, or set denoise_weight to 0)")
    return denoisers, fns


def _gather_bad(accelerator: Any, bad: list) -> list:
    if accelerator.num_processes == 1:
        return list(bad)
    from accelerate.utils import gather_object

    return list(gather_object(list(bad)))


def _reduce(accelerator: Any, step_losses: list[dict[str, torch.Tensor]], names: list[str], samples: int
            ) -> tuple[dict[str, float], int]:
    """Mean of each loss over the micro-batches of a step and over processes, and the step's samples.

    ``names`` is the same on every process, so the collective has one shape everywhere even when
    a process's batches lack a modality; a loss no batch produced is left out.
    """
    sums = torch.zeros(len(names), dtype=torch.float64)
    counts = torch.zeros(len(names), dtype=torch.float64)
    for d in step_losses:
        for i, k in enumerate(names):
            if k in d:
                sums[i] += float(d[k])
                counts[i] += 1
    extra = torch.tensor([float(samples)], dtype=torch.float64)
    both = accelerator.reduce(torch.cat([sums, counts, extra]).to(accelerator.device), "sum").cpu()
    sums, counts = both[: len(names)], both[len(names): 2 * len(names)]
    return {k: float(sums[i] / counts[i]) for i, k in enumerate(names) if counts[i] > 0}, int(both[-1])


def _append_metrics(path: Path, metrics: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(metrics) + "\n")
        f.flush()


def _trim_metrics(path: Path, step: int) -> None:
    """After a resume, drop log lines of steps that are about to be redone."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _progress(enabled: bool, total: int, initial: int, stage: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"stage {stage}", unit="step", dynamic_ncols=True)
