"""Start-up cost of the ``anymodal`` command, measured side by side with the cost of importing its stack.

Each command runs as a fresh child process; its CPU time (user + system) is read from
``resource.getrusage(RUSAGE_CHILDREN)``, so time spent waiting for a busy core does not count, and its
wall time is recorded beside it. The commands run round-robin, ``--repeats`` times each, so that a
change in the machine's load falls on all of them alike:

- ``baseline``: ``python -c "import torch, transformers, diffusers"`` (the reference of issue 21);
- ``model classes``: the baseline plus importing the transformers/diffusers classes the shipped
  default model is built from (Llama, the CLIP text model, the UNet, the VAE, the scheduler and the
  tokenizer): what any program that runs this model pays before it computes anything;
- ``--help`` and ``--version``;
- the README's main command, ``anymodal generate "a red circle on a blue background" --out DIR``
  (a fresh DIR each time);
- the main command's own work: a second ``generate`` inside one process, once everything is imported.

    python bench/bench_startup.py                # 5 repeats, writes bench/results/startup.json
    python bench/bench_startup.py --repeats 9 --out /tmp/startup.json

Child processes get ``OMP_NUM_THREADS=1`` (as the README advises on a shared 2-core machine) and
``HF_HUB_OFFLINE=1``. Targets (issue 21): ``--help``/``--version`` within 0.5 s wall and importing no
torch; the main command's CPU time within 1.3x the baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable
MODEL_CLASSES = ("import torch, transformers, diffusers; "
                 "from transformers import LlamaForCausalLM, CLIPTextModel, PreTrainedTokenizerFast; "
                 "from diffusers import UNet2DConditionModel, AutoencoderKL, DPMSolverMultistepScheduler")
PROMPT = "a red circle on a blue background"


def anymodal_command() -> list[str]:
    script = Path(PY).with_name("anymodal")
    return [str(script)] if script.is_file() else [PY, "-m", "anymodal"]


def commands(out_root: Path) -> dict[str, object]:
    am = anymodal_command()
    return {
        "baseline": [PY, "-c", "import torch, transformers, diffusers"],
        "model_classes": [PY, "-c", MODEL_CLASSES],
        "help": [*am, "--help"],
        "version": [*am, "--version"],
        # a function: each repeat writes into a fresh directory
        "generate": lambda i: [*am, "generate", PROMPT, "--out", str(out_root / f"run{i}")],
    }


# In one process: the main command once (imports, warm-up), then again into a fresh folder; prints the
# second run's CPU seconds: anymodal's own work (load, generate, save) once the libraries are imported.
WARM_PROBE = """import sys, time
from anymodal.cli import main
for i, out in enumerate(sys.argv[1:3]):
    t = time.process_time()
    try:
        main(["generate", %r, "--out", out])
    except SystemExit as e:
        if e.code:
            raise
print("work_cpu_s", time.process_time() - t)
""" % PROMPT


def warm_work(out_root: Path, i: int, env: dict[str, str]) -> float:
    """CPU seconds of a second ``anymodal generate`` in the same process (see ``WARM_PROBE``)."""
    argv = [PY, "-c", WARM_PROBE, str(out_root / f"warm{i}a"), str(out_root / f"warm{i}b")]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the warm probe failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
    return float(proc.stdout.strip().splitlines()[-1].split()[1])


def run_once(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall


def imports_torch(argv: list[str], env: dict[str, str]) -> bool:
    """Whether the CLI run with ``argv[-1]`` (``--help``/``--version``) imports torch, checked in-process."""
    probe = ("import sys\nfrom anymodal.cli import main\ntry:\n    main([%r])\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules)" % argv[-1])
    out = subprocess.run([PY, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1] == "True"


def summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="runs of each command (default 5)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "startup.json"),
                    help="where to write the results (default bench/results/startup.json)")
    args = ap.parse_args()

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out_root = Path(tempfile.mkdtemp(prefix="anymodal-startup-"))
    try:
        cmds = commands(out_root)
        cpu: dict[str, list[float]] = {k: [] for k in cmds}
        wall: dict[str, list[float]] = {k: [] for k in cmds}
        for i in range(args.repeats):
            for name, argv in cmds.items():
                c, w = run_once(argv(i) if callable(argv) else argv, env)
                cpu[name].append(c)
                wall[name].append(w)
                print(f"repeat {i + 1}/{args.repeats} {name:<14} cpu {c:6.2f} s  wall {w:6.2f} s", flush=True)
        torch_on_help = {k: imports_torch(cmds[k], env) for k in ("help", "version")}
        work = [warm_work(out_root, i, env) for i in range(args.repeats)]
    finally:
        shutil.rmtree(out_root, ignore_errors=True)

    base = statistics.median(cpu["baseline"])
    paired = [g / b for g, b in zip(cpu["generate"], cpu["baseline"])]
    result = {
        "what": "CPU (user+system) and wall seconds of fresh processes, run round-robin",
        "python": platform.python_version(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_at_end": list(os.getloadavg())},
        "env": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        "repeats": args.repeats,
        "commands": {name: (argv(0) if callable(argv) else argv) for name, argv in cmds.items()},
        "cpu_s": {k: summary(v) | {"samples": v} for k, v in cpu.items()},
        "wall_s": {k: summary(v) | {"samples": v} for k, v in wall.items()},
        "generate_cpu_over_baseline": {"median_ratio": statistics.median(paired), "paired_ratios": paired,
                                       "ratio_of_medians": statistics.median(cpu["generate"]) / base,
                                       "target": 1.3},
        "model_classes_cpu_over_baseline": statistics.median(cpu["model_classes"]) / base,
        # the main command's own work, measured as a second run inside one process: what is left of
        # the generate figure once the baseline and the model classes' imports are taken out
        "generate_work_cpu_s": summary(work) | {"samples": work},
        "help_imports_torch": torch_on_help["help"],
        "version_imports_torch": torch_on_help["version"],
        "help_wall_target_s": 0.5,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nmedian CPU s: " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in cpu.items()))
    print(f"median wall s: " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in wall.items()))
    print(f"generate / baseline CPU: {result['generate_cpu_over_baseline']['median_ratio']:.2f}x "
          f"(model classes alone: {result['model_classes_cpu_over_baseline']:.2f}x; anymodal's own work "
          f"{statistics.median(work):.2f} s); "
          f"--help imports torch: {torch_on_help['help']}; written to {args.out}")


if __name__ == "__main__":
    main()
