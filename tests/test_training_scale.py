"""The accelerate configs for sharded 7B training (configs/training/accelerate_*_7b.yaml), exercised
as far as a CPU machine allows.

* FSDP: accelerate does not run it on CPU. With ``use_cpu`` (or ACCELERATE_USE_CPU=1) its state
  becomes MULTI_CPU and ``prepare`` wraps the model in DDP, silently (shown below), so a "2-process
  FSDP on CPU" run through accelerate would be a DDP run under another name. The FSDP config is
  therefore checked by a dry run: accelerate's own launcher reads it and builds the environment the
  processes would get, accelerate's FSDP plugin is built from that environment, and its auto-wrap
  policy is resolved against a (tiny) Llama, which finds ``LlamaDecoderLayer``.
* DeepSpeed ZeRO-2: deepspeed is not installed here (and needs CUDA); the launcher builds the
  environment from the config, and its values are checked against configs/training/nextgpt-7b.yaml.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from test_training import data_dir  # noqa: F401  (the fixture: tiny captions and dialogues)

TRAINING = ROOT / "configs" / "training"


def _launch_args(config: Path, extra: list[str] | None = None):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(config), *(extra or []), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


def test_fsdp_config_dry_run(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from transformers import LlamaConfig, LlamaForCausalLM

    args, _ = _launch_args(TRAINING / "accelerate_fsdp_7b.yaml")
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_USE_ORIG_PARAMS"] == "true"
    assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    # the plugin refuses sync_module_states when it finds no GPU; it is built as a GPU process builds it
    import accelerate.utils.dataclasses as adc

    monkeypatch.setattr(adc, "get_torch_accelerator_backend", lambda *a, **k: ("cuda", None))
    plugin = FullyShardedDataParallelPlugin()  # reads and checks the environment, as each process would
    assert plugin.use_orig_params and str(plugin.state_dict_type).endswith("SHARDED_STATE_DICT")
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2))
    plugin.set_auto_wrap_policy(tiny)  # raises if no LlamaDecoderLayer is found
    assert plugin.auto_wrap_policy is not None


def test_zero2_config_dry_run_agrees_with_the_training_config():
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults = _launch_args(TRAINING / "accelerate_zero2_7b.yaml")
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    tcfg = yaml.safe_load((TRAINING / "nextgpt-7b.yaml").read_text())
    assert int(env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"]) == tcfg["gradient_accumulation_steps"]
    assert float(env["ACCELERATE_GRADIENT_CLIPPING"]) == tcfg["max_grad_norm"]
    assert env["ACCELERATE_MIXED_PRECISION"] == tcfg["mixed_precision"]
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed ZeRO cannot run here: deepspeed is not installed and needs CUDA; "
                    "the config was checked by the dry run above")


FSDP_ON_CPU = """
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: "no"
use_cpu: true
rdzv_backend: static
same_network: true
fsdp_config: {fsdp_version: 2, fsdp_auto_wrap_policy: NO_WRAP, fsdp_state_dict_type: FULL_STATE_DICT}
"""

PROBE = """
import torch
from accelerate import Accelerator
acc = Accelerator(cpu=True)
model = acc.prepare(torch.nn.Linear(2, 2))
print(acc.distributed_type, type(model).__name__, flush=True)
"""


@pytest.mark.slow
def test_accelerate_turns_fsdp_on_cpu_into_ddp(tmp_path):
    """Why there is no CPU FSDP run: accelerate makes it DDP (if this ever changes, this test says so)."""
    (tmp_path / "fsdp.yaml").write_text(FSDP_ON_CPU)
    (tmp_path / "probe.py").write_text(PROBE)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(tmp_path / "fsdp.yaml"), str(tmp_path / "probe.py")], env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("DistributedType")]
    assert lines == ["DistributedType.MULTI_CPU DistributedDataParallel"] * 2


# ---------------------------------------------------------------- two processes against one
def _training_yaml(tmp: Path, accumulation: int) -> Path:
    cfg = yaml.safe_load((TRAINING / "tiny.yaml").read_text())
    cfg.update(gradient_accumulation_steps=accumulation, lora={**cfg["lora"], "dropout": 0.0})
    path = tmp / f"training-acc{accumulation}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _image_in_and_out(data_dir: Path, tmp: Path) -> Path:
    """Dialogues that each take an image and make one: every micro-batch uses every trained part."""
    import json

    rows = [{"messages": [{"role": "user", "content": ["draw this again ", {"image": f"img/{n}.png"}]},
                          {"role": "assistant", "content": ["here: ", {"image": None, "caption": f"a {n} square"}]}]}
            for n in ("red", "green", "blue", "white")]
    path = data_dir / "image_in_and_out.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("stage,data", [(1, "images.jsonl"), (3, "image_in_and_out.jsonl")])
def test_two_processes_give_the_single_process_losses(data_dir, tmp_path, stage, data):
    """2 gloo processes (DDP: what accelerate runs on CPU), batch 2 each, against 1 process with batch 2
    and 2 accumulation steps: the same micro-batches (rank r takes the sampler's batches r, r+2, ...),
    the same averaged gradients, so the same losses step by step.

    Two conditions make the layouts equal: LoRA dropout is off (its masks are seeded per process and
    micro-batch, which differ between the layouts), and every micro-batch uses every trained part
    (images in, images out): a part no micro-batch of a step uses gets no gradient in one process
    but a zero gradient from DDP (find_unused_parameters), and AdamW moves it on its momentum."""
    import json

    from anymodal.training import train

    _image_in_and_out(data_dir, tmp_path)
    tiny = ROOT / "configs" / "tiny.yaml"
    single = train(tiny, data_dir / data, tmp_path / "one", _training_yaml(tmp_path, 2), stage=stage, max_steps=3,
                   batch_size=2, device="cpu", progress=False, save_every=0)
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "anymodal", "train",
           "--stage", str(stage), "--config", str(tiny), "--data", str(data_dir / data), "--out", str(tmp_path / "two"),
           "--training-config", str(_training_yaml(tmp_path, 1)), "--max-steps", "3", "--batch-size", "2",
           "--save-every", "0", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [m["samples"] for m in two] == [4, 8, 12]  # both processes, cumulative
    assert len(single.losses) == 3
    assert [m["loss"] for m in two] == pytest.approx(single.losses, rel=1e-5)
