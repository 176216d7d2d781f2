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
