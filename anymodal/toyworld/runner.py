"""Running the toy world's phases: :func:`train` and :func:`run_phase`.

:data:`PHASES` in order, :data:`REQUIRES` (what each phase reads from) and :data:`OUTPUTS` (where
each result lives and the file that marks it finished). :func:`run_phase` refuses to start a phase
whose inputs are missing, binds a run to its settings, and writes ``done.json`` and the results
file; :func:`train` runs phases in order, or up to ``jobs`` at once in worker processes
(:func:`_train_parallel`), sharing threads among them (:class:`~.loop.ThreadShare`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..utils import atomic_write_text
from . import audio_generator, image_generator, video_generator
from .encoder import train_encoder
from .llm import train_llm
from .loop import JsonlLog, RunControl, Stop, ThreadShare, check_same_config, directory_size, resolve_device
from .manifests import write_manifests
from .recipe import ModelPhasesConfig, ToyworldTrainConfig
from .stages import run_stages
from .tokenizer import train_tokenizer


PHASES: tuple[str, ...] = ("tokenizer", "image-vae", "image-generator", "audio-generator", "video-generator",
                           "manifests", "encoder", "llm", "stages")
# The phases each phase reads from; run_phase refuses to start until they have finished.
REQUIRES: dict[str, tuple[str, ...]] = {
    "tokenizer": (),
    # The image VAE is a phase of its own so that the video generator, which encodes its frames with
    # it, trains beside the image UNet instead of after it (off the critical path of a parallel run).
    "image-vae": (),
    "image-generator": ("tokenizer", "image-vae"),
    "audio-generator": ("tokenizer",),
    "video-generator": ("tokenizer", "image-vae"),
    "manifests": (),
    "encoder": (),
    "llm": ("tokenizer", "encoder"),  # the LLM is pretrained reading the encoder's features
    "stages": ("tokenizer", "image-vae", "image-generator", "audio-generator", "video-generator", "manifests",
               "encoder", "llm"),
}
# Where each phase's result lives in --out, and the file whose presence means it finished.
OUTPUTS: dict[str, tuple[str, str]] = {
    "tokenizer": ("tokenizer", "tokenizer.json"),
    "image-vae": ("image-vae", "diffusion_pytorch_model.safetensors"),
    "image-generator": ("image-generator", "model_index.json"),
    "audio-generator": ("audio-generator", "model_index.json"),
    "video-generator": ("video-generator", "model_index.json"),
    "manifests": ("data", "manifest.json"),
    "encoder": ("encoder", "model.safetensors"),
    "llm": ("llm", "config.json"),
    "stages": ("final", "anymodal_index.json"),
}


@dataclass
class PhaseResult:
    phase: str
    status: str  # "done", "skipped" (already done), "stopped" (deadline; resumable)
    path: str | None = None
    figures: dict[str, Any] | None = None
    message: str = ""


def _machine(device: str = "cpu") -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": device}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _median_rate(log: JsonlLog, stage: str) -> float | None:
    """Median steps/s of ``stage`` over the logged records (all runs of the phase), for the results file."""
    rates = [r["steps_per_s"] for r in log.records() if r.get("stage") == stage and "steps_per_s" in r]
    return round(float(np.median(rates)), 3) if rates else None


# The generator phases: how each trains, how its saved pipeline is scored, and what that score means.
_GENERATOR_PHASES: dict[str, tuple[Callable[..., Path], Callable[..., dict[str, Any]], str]] = {
    "image-generator": (image_generator.train_image_generator, image_generator.evaluate_image_generator,
                        image_generator.EVALUATION_NOTE),
    "audio-generator": (audio_generator.train_audio_generator, audio_generator.evaluate_audio_generator,
                        audio_generator.EVALUATION_NOTE),
    "video-generator": (video_generator.train_video_generator, video_generator.evaluate_video_generator,
                        video_generator.EVALUATION_NOTE),
}


def _phase_config(cfg: ToyworldTrainConfig, phase: str) -> Any:
    if phase == "image-vae":  # the image generator's section holds its VAE's settings
        return cfg.image_generator
    return getattr(cfg, phase.replace("-", "_"))


def _phase_settings(cfg: ToyworldTrainConfig, phase: str) -> dict[str, Any]:
    """The settings a phase's run is bound to (checked on resume)."""
    if phase == "manifests":  # sized by the stages section
        return {k: getattr(cfg.stages, k) for k in ("n_captions", "n_dialogues", "seed")}
    return asdict(_phase_config(cfg, phase))


def check_requirements(phase: str, out: Path) -> None:
    """Raise ``ValueError`` naming the first phase ``phase`` reads from that has not finished in ``out``."""
    for need in REQUIRES[phase]:
        directory, marker = OUTPUTS[need]
        if not (out / directory / marker).is_file():
            raise ValueError(f"{phase} needs the {need!r} phase, which has not finished in {out} "
                             f"(no {out / directory / marker}); run the {need!r} phase first "
                             f"(anymodal toyworld train --out {out} --phase {need})")


def _run_model_phase(phase: str, out: Path, cfg: ToyworldTrainConfig, log: JsonlLog, control: RunControl
                     ) -> tuple[Path, dict[str, Any] | None]:
    """The manifests, encoder, llm or stages phase; returns its result's path and its figures."""
    st = cfg.stages
    if phase == "manifests":
        return write_manifests(out, st.n_captions, st.n_dialogues, st.seed, st.rephrased, st.sessions, st.copies,
                               progress=control.progress), None
    if phase == "encoder":
        path = train_encoder(out, cfg.encoder, log, control)
    elif phase == "llm":
        path = train_llm(out, cfg.llm, log, control)
    else:
        from ..pipeline import AnyModalPipeline
        from .evaluate import evaluate

        path = run_stages(out, ModelPhasesConfig(cfg.encoder, cfg.llm, cfg.stages), log, control)
        results = evaluate(AnyModalPipeline.from_pretrained(path, device=control.device), n=st.eval_prompts,
                           split="heldout", seed=st.seed, progress=control.progress)
        figures = {"heldout": {d: r.to_dict() for d, r in results.items()}}
        log.write(stage="final", event="eval", prompts_per_direction=st.eval_prompts, **figures)
        return path, figures
    written = out / "state" / phase / "figures.json"
    return path, (json.loads(written.read_text()) if written.exists() else None)


def _use_device(device: str) -> None:
    """On a GPU: make it torch's current CUDA device (what ``"cuda"`` means to accelerate in the stages
    and to diffusers) and allow TF32 matmuls and convolutions (the usual speed of fp32 training)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return
    if dev.index is not None:
        torch.cuda.set_device(dev)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def run_phase(phase: str, out: Path, cfg: ToyworldTrainConfig, control: RunControl, results_dir: Path | None,
              resume: bool) -> PhaseResult:
    """Run (or resume) one phase; returns what happened. Raises ``ValueError`` on misuse."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of: {', '.join(PHASES)}")
    state_dir = out / "state" / phase
    done_file = state_dir / "done.json"
    if done_file.exists():
        return PhaseResult(phase, "skipped", str(out / OUTPUTS[phase][0]),
                           json.loads(done_file.read_text()).get("figures"),
                           f"{phase}: already done (delete {state_dir} to retrain)")
    check_requirements(phase, out)
    if state_dir.exists() and any(state_dir.iterdir()) and not resume:
        raise ValueError(f"{state_dir} holds an unfinished run; pass --resume to continue it, or choose another --out")
    state_dir.mkdir(parents=True, exist_ok=True)
    check_same_config(state_dir / "config.json", _phase_settings(cfg, phase), phase)
    _use_device(control.device)
    log = JsonlLog(out / "logs" / f"{phase}.jsonl")
    t0 = time.time()
    try:
        path, figures = _train_and_score(phase, out, cfg, log, control)
    except Stop as e:
        return PhaseResult(phase, "stopped", None, None, str(e))
    summary = _summary(phase, path, figures, cfg, log, control, round(time.time() - t0, 1))
    atomic_write_text(done_file, json.dumps(summary, indent=2) + "\n")
    if figures is not None:  # always beside the run; into the repository's bench/results only when asked
        for where in {out / "results", *([results_dir] if results_dir is not None else [])}:
            Path(where).mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(where) / f"toyworld-{phase}.json", json.dumps(summary, indent=2) + "\n")
    return PhaseResult(phase, "done", str(path), figures, f"{phase}: done in {time.time() - t0:.0f} s -> {path}")


def _train_and_score(phase: str, out: Path, cfg: ToyworldTrainConfig, log: JsonlLog, control: RunControl
                     ) -> tuple[Path, dict[str, Any] | None]:
    """Train ``phase`` (raising :class:`~.loop.Stop` when stopped early) and score its result;
    returns the result's path and its figures (None for a phase without an evaluation)."""
    if phase == "tokenizer":
        return train_tokenizer(out, cfg.tokenizer, log), None
    if phase == "image-vae":
        return image_generator.train_image_vae(out, _phase_config(cfg, phase), log, control), None
    if phase not in _GENERATOR_PHASES:
        return _run_model_phase(phase, out, cfg, log, control)
    c = _phase_config(cfg, phase)
    trainer, evaluator, _ = _GENERATOR_PHASES[phase]
    path = trainer(out, c, log, control)
    figures = evaluator(path, c.final_eval_prompts, c.seed + 2000, c.sample_steps, c.guidance_scale,
                        device=control.device)
    log.write(stage="final", event="eval", prompts_per_split=c.final_eval_prompts, **figures)
    return path, figures


def _summary(phase: str, path: Path, figures: dict[str, Any] | None, cfg: ToyworldTrainConfig, log: JsonlLog,
             control: RunControl, seconds: float) -> dict[str, Any]:
    """What ``done.json`` (and the results file) records of a finished phase: its figures, settings,
    machine, speed, size and what its evaluation measured."""
    summary = {"phase": phase, "path": str(path), "figures": figures, "config": _phase_settings(cfg, phase),
               "seconds_this_run": seconds, "machine": _machine(control.device)}
    if phase in _GENERATOR_PHASES:
        phase_cfg = _phase_config(cfg, phase)
        batch = {"vae": phase_cfg.vae_batch_size, "unet": phase_cfg.batch_size}
        summary["speed"] = {stage: {"median_steps_per_s": _median_rate(log, stage), "batch_size": size}
                            for stage, size in batch.items()}
        summary["size_bytes"] = directory_size(path)
        summary["evaluation"] = _GENERATOR_PHASES[phase][2]
        vae_records = [r for r in log.records() if r.get("event") == "latents"]
        if vae_records:
            summary["vae_reconstruction"] = vae_records[-1].get("reconstruction")
        evals = [r for r in log.records() if r.get("event") == "eval" and r.get("stage") in ("unet", "vocoder")]
        summary["during_training"] = [{k: v for k, v in r.items() if k not in ("time", "event")} for r in evals]
    elif phase in ("encoder", "llm"):
        batch_size = _phase_config(cfg, phase).batch_size
        summary["speed"] = {phase: {"median_steps_per_s": _median_rate(log, phase), "batch_size": batch_size}}
    if phase in ("encoder", "llm", "stages"):
        summary["size_bytes"] = directory_size(path)
    if phase == "stages":
        summary["stages"] = [{k: v for k, v in r.items() if k != "time"} for r in log.records()
                             if r.get("event") == "done"]
        summary["evaluation"] = ("anymodal eval (anymodal.toyworld.evaluate) on out/final: held-out toy-world "
                                 "prompts per direction, scored by the analytic checkers")
    return summary


def train(out: str | os.PathLike = "runs/toyworld", phases: Sequence[str] | None = None,
          config: ToyworldTrainConfig | str = "default", max_minutes: float | None = None, resume: bool = False,
          results_dir: str | os.PathLike | None = None, progress: bool = True,
          stop_at_step: int | None = None, overrides: Sequence[str] = (), jobs: int = 1,
          threads: int | None = None, device: str | None = "cpu",
          share_idle_cores: bool = True) -> list[PhaseResult]:
    """Train the requested phases (default: all, in order) into ``out``.

    ``jobs`` > 1 runs up to that many phases at once, each in its own process, as soon as the
    phases it reads from (``REQUIRES``) have finished: on two cores, ``jobs=2`` trains the image
    generator beside the audio generator, the encoder and the LLM. ``threads`` sets each
    process's torch threads. With ``share_idle_cores`` (the default) and ``threads`` given, the
    ``jobs * threads`` threads are shared among the phases running at the moment: when a phase ends
    and nothing can start in its place, the others take its threads (between two steps; a phase
    that starts later takes them back), and the stages, which always run alone, start with all of
    them. Thread counts change floating-point rounding, so such a run's weights depend on when
    phases ended; ``share_idle_cores=False`` keeps every phase at ``threads`` for weights that
    repeat bit for bit from run to run.

    ``device`` is where every phase trains and evaluates: ``"cpu"`` (the default, and the timed
    recipe), ``"cuda"``/``"cuda:N"``, or ``"auto"`` (a CUDA GPU when torch sees one). Models are
    built and the phases' random draws made on the CPU, so a run starts from the same weights and
    batches on every device; results still differ between devices, by floating-point rounding and
    by the dropout masks of the text encoders (drawn on the device). A run may be resumed on
    another device (checkpoints load onto whichever device resumes them).

    ``max_minutes`` bounds this invocation's wall time: the running phase checkpoints and stops,
    and a later call with ``resume=True`` carries on. ``overrides`` are ``section.field=value``
    strings (see :meth:`ToyworldTrainConfig.with_overrides`); a resumed run must use the same
    ones. ``stop_at_step`` (for tests) stops every training loop of the current phase once it
    reaches that step.
    """
    cfg = ToyworldTrainConfig.preset(config) if isinstance(config, str) else config
    cfg = cfg.with_overrides(overrides)
    order = list(PHASES) if not phases else list(dict.fromkeys(phases))
    for p in order:
        if p not in PHASES:
            raise ValueError(f"unknown phase {p!r}; expected one of: {', '.join(PHASES)}")
    if max_minutes is not None and max_minutes <= 0:
        raise ValueError(f"max_minutes must be positive, got {max_minutes!r}")
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    control = RunControl(None if max_minutes is None else time.time() + 60.0 * max_minutes, stop_at_step, progress,
                         resolve_device(device))
    out_path = Path(out)
    results_path = None if results_dir is None else Path(results_dir)
    if jobs > 1 and len(order) > 1:
        return _train_parallel(sorted(order, key=PHASES.index), out_path, cfg, control, results_path, resume, jobs,
                               threads, share_idle_cores)
    if threads is not None:
        torch.set_num_threads(threads)
    results: list[PhaseResult] = []
    for p in sorted(order, key=PHASES.index):
        result = run_phase(p, out_path, cfg, control, results_path, resume)
        results.append(result)
        if result.status == "stopped":
            break
    return results


def _phase_worker(threads: int | None, share: Path | None, phase: str, out: Path, cfg: ToyworldTrainConfig,
                  control: RunControl, *args: Any) -> PhaseResult:
    """One phase in a worker process (spawned: a fresh interpreter, its own torch threads), following
    the scheduler's thread shares when ``share`` names its file."""
    if control.orphaned():  # the scheduler ended before this phase could start
        raise RuntimeError(f"{phase}: the scheduler process {control.parent} has ended; not starting")
    if threads is not None:
        torch.set_num_threads(threads)
    if share is not None:
        control = replace(control, threads=ThreadShare(share, phase, current=threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return run_phase(phase, out, cfg, control, *args)


@contextlib.contextmanager
def _workers_end_with(pool: Any) -> Iterator[None]:
    """While the scheduler runs, a SIGTERM to it ends it like Ctrl-C; either ends the worker processes
    too (from the last checkpoint each wrote, ``--resume`` goes on) instead of waiting for their phases
    to finish. A worker whose scheduler was killed outright stops by itself (``RunControl.parent``)."""
    def to_interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, to_interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    except KeyboardInterrupt:
        for proc in list(getattr(pool, "_processes", {}).values()):  # the executor keeps no public handle on them
            if proc.is_alive():
                proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _train_parallel(order: list[str], out: Path, cfg: ToyworldTrainConfig, control: RunControl,
                    results_dir: Path | None, resume: bool, jobs: int, threads: int | None,
                    share_idle_cores: bool = True) -> list[PhaseResult]:
    """Run ``order`` with up to ``jobs`` phases at once, each starting once the phases of ``order``
    it requires have finished. A stopped phase (``max_minutes``) starts nothing new; a failed one
    cancels what has not started and re-raises once the running phases have ended. With
    ``share_idle_cores`` and ``threads``, ``jobs * threads`` threads are split among the running
    phases (:class:`ThreadShare`) each time the set of running phases changes."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

    pending = list(order)
    finished: set[str] = set()
    results: dict[str, PhaseResult] = {}
    running: dict[Future, str] = {}
    error: BaseException | None = None
    stopped = False
    share = out / "state" / "threads.json" if share_idle_cores and threads is not None else None
    written: dict[str, int] | None = None
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool, \
            _workers_end_with(pool):
        while True:
            starting: list[str] = []
            if error is None and not stopped:
                for p in [p for p in pending if all(r in finished or r not in order for r in REQUIRES[p])]:
                    if len(running) + len(starting) >= jobs:
                        break
                    pending.remove(p)
                    starting.append(p)
            shares = {p: threads for p in starting}
            if share is not None and (running or starting):
                shares = ThreadShare.split(jobs * threads, [*running.values(), *starting])
                if shares != written:  # a phase ended with nothing to start in its place, or one starts
                    share.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(share, json.dumps(shares) + "\n")
                    written = shares
            for p in starting:  # a worker stops (after a checkpoint) if this process dies: control.parent
                running[pool.submit(_phase_worker, shares[p], share, p, out, cfg, replace(control, parent=os.getpid()),
                                    results_dir, resume)] = p
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                p = running.pop(fut)
                try:
                    results[p] = fut.result()
                except BaseException as e:  # noqa: BLE001 - re-raised below, after the running phases end
                    error = error or e
                    continue
                if results[p].status == "stopped":
                    stopped = True
                else:
                    finished.add(p)
    if error is not None:
        raise error
    return [results[p] for p in order if p in results]
