"""What every toy-world phase shares: the checkpointed training loop and its small machinery.

:func:`train_loop` runs one optimiser step at a time from the last checkpoint, so a phase stops at
a deadline and resumes bit for bit; :class:`EMA` and :func:`cosine_lr` are the recipe's averaging
and schedule; :class:`JsonlLog` is a phase's log; :class:`RunControl` says when to stop and where to
run; :class:`ThreadShare` lets a phase of a parallel run follow the scheduler's thread shares;
:func:`atomic_save` and :func:`atomic_dir` write nothing half-way.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..utils import atomic_dir as utils_atomic_dir, atomic_path, atomic_write_text, check_device


class JsonlLog:
    """An append-only JSONL log of one phase. :meth:`rewind` drops what a resumed run will redo."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), **record}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def rewind(self, stage: str, step: int) -> None:
        """Drop the records of ``stage`` after ``step`` (work lost since the checkpoint being resumed)."""
        kept = [r for r in self.records() if not (r.get("stage") == stage and r.get("step", 0) > step)]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace`` it over ``path``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_dir(path: Path, write: Callable[[Path], None]) -> Path:
    """Let ``write`` fill a temporary directory beside ``path``, then swap it in for ``path``
    (:func:`anymodal.utils.atomic_dir`); returns ``path``."""
    utils_atomic_dir(path, write)
    return path


def directory_size(directory: Path) -> int:
    """Bytes of every file under ``directory``."""
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, modules: Sequence[torch.nn.Module], decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_to(self, modules: Sequence[torch.nn.Module]) -> None:
        targets = [p for m in modules for p in m.parameters() if p.requires_grad]
        if len(targets) != len(self.shadow):
            raise ValueError(f"EMA holds {len(self.shadow)} tensors, the modules have {len(targets)}")
        for t, s in zip(targets, self.shadow):
            t.copy_(s)

    def state_dict(self) -> list[torch.Tensor]:
        return [s.clone() for s in self.shadow]

    def load_state_dict(self, state: list[torch.Tensor]) -> None:
        if len(state) != len(self.shadow):
            raise ValueError(f"EMA checkpoint holds {len(state)} tensors, expected {len(self.shadow)}")
        for s, v in zip(self.shadow, state):
            s.copy_(v)


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor,
                   clip_params: Sequence[torch.nn.Parameter] | None = None) -> float:
    """One optimiser step on ``loss`` (gradient norm clipped to 1 over ``clip_params`` when given);
    returns the loss as a float, what every phase's ``step_fn`` reports."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    opt.step()
    return float(loss.detach())


def cosine_lr(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to zero at ``total``."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Stop(Exception):
    """Raised inside a loop when ``--max-minutes`` or ``stop_at_step`` is reached (after a checkpoint)."""


@dataclass
class RunControl:
    """When to stop this invocation: a wall-clock deadline, for tests a step to stop at, and in a
    worker of a parallel run the scheduler's process id (``parent``): a worker whose scheduler is
    gone (killed) stops at its next step, after a checkpoint, instead of training on unattended
    (and racing a rerun for the same run directory)."""

    deadline: float | None = None
    stop_at_step: int | None = None
    progress: bool = True
    device: str = "cpu"  # where the phases train and evaluate (resolve_device's answer)
    threads: "ThreadShare | None" = None  # set in a worker of a parallel run that shares idle cores
    parent: int | None = None  # set in a worker of a parallel run: the scheduler's pid

    def orphaned(self) -> bool:
        """True in a worker whose scheduler process has ended (the worker was re-parented)."""
        return self.parent is not None and os.getppid() != self.parent

    def should_stop(self, step: int) -> bool:
        if self.stop_at_step is not None and step >= self.stop_at_step:
            return True
        if self.orphaned():
            return True
        return self.deadline is not None and time.time() >= self.deadline


class ThreadShare:
    """How many torch threads one phase of a parallel run may use, as the scheduler last said.

    The scheduler of :func:`~anymodal.toyworld.runner.train` rewrites a small JSON file, ``{phase: threads}``,
    whenever phases start or end; :func:`train_loop` calls :meth:`follow` between steps, which
    re-reads it only when it changed and applies this phase's share with ``torch.set_num_threads``.
    """

    def __init__(self, path: Path, phase: str, current: int | None = None):
        self.path, self.phase, self.current = Path(path), phase, current  # current: the count set at start
        self._seen: tuple[int, int, int] | None = None

    @staticmethod
    def split(budget: int, phases: Sequence[str]) -> dict[str, int]:
        """``budget`` threads over ``phases`` (in start order): equal shares, the first ones get the rest."""
        each, extra = divmod(budget, max(len(phases), 1))
        return {p: max(1, each + (i < extra)) for i, p in enumerate(phases)}

    def follow(self) -> int | None:
        """Apply this phase's share if the file changed since the last call; the new count, or None."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        if (st.st_ino, st.st_mtime_ns, st.st_size) == self._seen:  # rewritten by rename: a new inode
            return None
        self._seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        try:
            n = json.loads(self.path.read_text()).get(self.phase)
        except (OSError, ValueError):  # written atomically, so only a foreign edit gets here
            return None
        if not isinstance(n, int) or n < 1 or n == self.current:
            return None
        self.current = n
        torch.set_num_threads(n)
        return n


DEVICES = "cpu, cuda, cuda:N or auto"


def resolve_device(device: str | torch.device | None) -> str:
    """The device the phases run on: ``"auto"`` (or ``None``) is ``"cuda"`` when torch sees a GPU and
    ``"cpu"`` otherwise; a named device must exist on this machine (``ValueError`` naming it if not,
    from :func:`anymodal.utils.check_device`, the CLI's one check)."""
    device = "auto" if device is None else device
    try:
        kind = "auto" if str(device) == "auto" else torch.device(device).type
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"unknown device {device!r}; expected {DEVICES}") from e
    if kind not in ("auto", "cpu", "cuda"):  # mps: the stages' loss bookkeeping is float64, which MPS lacks
        raise ValueError(f"device {device!r} is not supported here; expected {DEVICES}")
    return check_device(device)


def device_of(module: torch.nn.Module) -> torch.device:
    """Where ``module``'s first parameter lives (the phases move whole models, so all of it)."""
    return next(module.parameters()).device


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_same_config(path: Path, current: dict[str, Any], phase: str) -> None:
    """Record a phase's settings at its first start; a resumed run must use the same ones."""
    current = json.loads(json.dumps(current))  # tuples -> lists, as stored
    if not path.exists():
        atomic_write_text(path, json.dumps(current, indent=2) + "\n")
        return
    saved = json.loads(path.read_text())
    changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if changed:
        raise ValueError(f"{phase}: the unfinished run in {path.parent} was started with other settings "
                         f"({', '.join(changed)} differ); resume with the same preset and --set overrides, "
                         f"or delete {path.parent}")


def _progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True,
                mininterval=2.0, smoothing=0.1)


def train_loop(*, stage: str, total: int, ckpt: Path, modules: dict[str, torch.nn.Module],
               optimizer: torch.optim.Optimizer, gen: torch.Generator, ema: EMA | None,
               step_fn: Callable[[int], float], lr_fn: Callable[[int], float], log: JsonlLog,
               checkpoint_every: int, log_every: int, control: RunControl,
               on_step: Callable[[int], None] | None = None) -> None:
    """Run ``step_fn(step)`` (one optimiser step, returns the loss) from the last checkpoint to ``total``.

    Checkpoints hold the modules, optimiser, EMA, RNG state and step, and are written every
    ``checkpoint_every`` steps, at the end, and before stopping early (raising :class:`Stop`).
    Each step runs with torch's global generator seeded from ``gen``'s seed and the step (and
    restored afterwards), so modules that draw from it (dropout in a text encoder) are reproducible
    and resume bit for bit too.
    """
    base_seed = gen.initial_seed()  # the caller's seed, read before a checkpoint's state replaces it

    def save(step: int) -> None:
        atomic_save({"step": step, "modules": {k: m.state_dict() for k, m in modules.items()},
                     "optimizer": optimizer.state_dict(), "ema": ema.state_dict() if ema else None,
                     "rng": gen.get_state()}, ckpt)
        log.write(stage=stage, step=step, event="checkpoint")

    start = 0
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        for k, m in modules.items():
            m.load_state_dict(state["modules"][k])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        gen.set_state(state["rng"])
        start = int(state["step"])
        log.rewind(stage, start)
        if start < total:
            log.write(stage=stage, step=start, event="resume")
    if start >= total:
        return
    for m in modules.values():
        m.train()
    bar = _progress(total, start, stage, control.progress)
    t0, s0, running = time.time(), start, None
    try:
        for step in range(start, total):
            lr = lr_fn(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((base_seed * 1_000_003 + step) % 2**63)
                loss = step_fn(step)
            if ema is not None:
                ema.update(step)
            done = step + 1
            if control.threads is not None and (n := control.threads.follow()) is not None:
                log.write(stage=stage, step=done, event="threads", threads=n)
            running = loss if running is None else 0.95 * running + 0.05 * loss
            rate = (done - s0) / max(time.time() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2e}", refresh=False)
            if done % log_every == 0 or done == total:
                log.write(stage=stage, step=done, loss=loss, loss_avg=running, lr=lr, steps_per_s=rate)
            if done % checkpoint_every == 0 or done == total:
                save(done)
            if on_step is not None:
                on_step(done)
            if done < total and control.should_stop(done):
                if done % checkpoint_every:
                    save(done)
                raise Stop(f"{stage}: stopped at step {done}/{total}; rerun with --resume to continue")
    finally:
        bar.close()
    for m in modules.values():
        m.eval()
