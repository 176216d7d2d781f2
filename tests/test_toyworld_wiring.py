"""``anymodal toyworld train`` through every phase (the model side included) at smoke size, stopping
and resuming a model phase, refusing a phase whose inputs are missing, and ``anymodal toyworld ship``
(weights stored in float16, loaded as float32)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from anymodal.modality import Modality
from anymodal.toyworld import loop as L
from anymodal.toyworld import runner as RN
from anymodal.toyworld import ship as SH
from anymodal.toyworld import train as T

torch.set_num_threads(1)


def _fast() -> T.ToyworldTrainConfig:
    cfg = T.ToyworldTrainConfig.preset("smoke")
    fast = dict(vae_steps=1, steps=1, checkpoint_every=1, final_eval_prompts=1)  # loadable, not trained
    return replace(cfg, image_generator=replace(cfg.image_generator, **fast),
                   audio_generator=replace(cfg.audio_generator, **fast),
                   video_generator=replace(cfg.video_generator, **fast))


def _train(out: Path, phases=None, **kw) -> list[RN.PhaseResult]:
    return T.train(out, phases=phases, config=_fast(), results_dir=out / "results", progress=False, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Every phase of a smoke run, with the LLM stopped at a step and the stages at --max-minutes on the way."""
    out = tmp_path_factory.mktemp("wired")
    first = ["tokenizer", "image-vae", "image-generator", "audio-generator", "video-generator", "manifests", "encoder"]
    assert [r.status for r in _train(out, first)] == ["done"] * 7
    with pytest.raises(ValueError, match=r"stages needs the 'llm' phase.*--phase llm\)"):
        _train(out, ["stages"])
    [r] = _train(out, ["llm"], stop_at_step=1)
    assert r.status == "stopped" and "--resume" in r.message
    with pytest.raises(ValueError, match="--resume"):
        _train(out, ["llm"])
    [r] = _train(out, ["llm"], resume=True)
    assert r.status == "done"
    [r] = _train(out, ["stages"], max_minutes=1e-6)  # the deadline has passed at the first checkpoint
    assert r.status == "stopped" and r.message.startswith("stage 1: stopped at step 1")
    results = _train(out, resume=True)
    assert [r.phase for r in results] == list(T.PHASES)
    assert [r.status for r in results] == ["skipped"] * 8 + ["done"]
    return out


def test_every_phase_runs_and_records_its_figures(run: Path):
    llm_steps = [r["step"] for r in L.JsonlLog(run / "logs" / "llm.jsonl").records() if "loss" in r]
    assert llm_steps == list(range(1, T.ToyworldTrainConfig.preset("smoke").llm.steps + 1))  # resumed, not redone
    metrics = [json.loads(x) for x in (run / "stages" / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for phase in ("encoder", "llm"):
        done = json.loads((run / "state" / phase / "done.json").read_text())
        assert done["machine"]["device"] == "cpu"
        assert done["figures"] == json.loads((run / "state" / phase / "figures.json").read_text())
        assert done["size_bytes"] > 0 and (run / "results" / f"toyworld-{phase}.json").is_file()
    assert (run / "data" / "manifest.json").is_file() and (run / "state" / "manifests" / "done.json").is_file()
    done = json.loads((run / "state" / "stages" / "done.json").read_text())
    table = done["figures"]["heldout"]
    assert set(table) == {"t2i", "t2a", "t2v", "i2t", "a2t", "v2t"} and all(r["n"] == 1 for r in table.values())
    assert done["path"] == str(run / "final") and [s["stage"] for s in done["stages"]][-1] == "stage3"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_phase_trains_on_a_gpu_and_a_cpu_run_resumes_there(tmp_path: Path):
    from anymodal.pipeline import AnyModalPipeline

    gpu = tmp_path / "gpu"
    assert [r.status for r in _train(gpu, device="cuda")] == ["done"] * len(T.PHASES)
    for phase in T.PHASES:
        assert json.loads((gpu / "state" / phase / "done.json").read_text())["machine"]["device"] == "cuda"
    stages = [r for r in L.JsonlLog(gpu / "logs" / "stages.jsonl").records() if r.get("event") == "done"]
    assert [r["device"].split(":")[0] for r in stages] == ["cuda"] * 3  # accelerate's own placement
    pipe = AnyModalPipeline.from_pretrained(gpu / "final", device="cuda")
    assert pipe.device.type == "cuda" and pipe("draw a red circle on a blue background", seed=0, max_new_tokens=8)
    mixed = tmp_path / "mixed"  # checkpoints written on the CPU load onto the GPU
    longer = ["image_generator.vae_steps=2"]  # a loop of one step cannot stop half-way
    [r] = _train(mixed, ["tokenizer", "image-vae"], stop_at_step=1, overrides=longer)[-1:]
    assert r.status == "stopped"
    assert _train(mixed, ["image-vae"], resume=True, device="cuda", overrides=longer)[0].status == "done"


def test_model_phase_settings_are_set_able_and_bound_to_the_run(tmp_path: Path):
    [r] = T.train(tmp_path, phases=["encoder"], config="smoke", results_dir=None, progress=False, stop_at_step=1,
                  overrides=["encoder.steps=3"])
    assert r.status == "stopped"
    assert json.loads((tmp_path / "state" / "encoder" / "config.json").read_text())["steps"] == 3
    with pytest.raises(ValueError, match="steps differ"):
        T.train(tmp_path, phases=["encoder"], config="smoke", results_dir=None, progress=False, resume=True)


def test_every_phase_has_its_inputs_and_output_declared():
    assert set(RN.REQUIRES) == set(RN.OUTPUTS) == set(T.PHASES)
    for phase, needs in RN.REQUIRES.items():  # a phase runs after what it reads
        assert all(T.PHASES.index(n) < T.PHASES.index(phase) for n in needs), phase
    assert set(RN.REQUIRES["stages"]) == set(T.PHASES) - {"stages"}


def test_a_phase_without_its_inputs_names_the_phase_to_run(tmp_path: Path, capsys):
    from anymodal.cli import main

    with pytest.raises(ValueError, match=r"llm needs the 'tokenizer' phase.*--phase tokenizer\)"):
        T.train(tmp_path, phases=["llm"], config="smoke", results_dir=None, progress=False)
    assert main(["toyworld", "train", "--out", str(tmp_path), "--preset", "smoke", "--phase", "stages",
                 "--no-progress"]) == 2
    assert "run the 'tokenizer' phase first" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()  # nothing started


def test_cli_prints_the_model_side_phases_figures(run: Path, capsys):
    from anymodal.cli import main

    assert main(["toyworld", "train", "--out", str(run), "--preset", "smoke", "--phase", "encoder", "--phase",
                 "stages"]) == 0
    out = capsys.readouterr().out
    assert "encoder: already done" in out and "heldout: image colour" in out and "heldout: t2i " in out


def _floating_tensors(pipe) -> list[tuple[str, torch.Tensor]]:
    tensors = [(f"model.{k}", v) for k, v in pipe.model.state_dict().items()]
    for m, gen in pipe.generators.items():
        for name, part in gen.pipeline.components.items():
            if isinstance(part, torch.nn.Module):
                tensors += [(f"{m.value}.{name}.{k}", v) for k, v in part.state_dict().items()]
    return [(k, v) for k, v in tensors if v.is_floating_point()]


def _weight_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*.safetensors") if f.parent.name != "vocoder")


def test_ship_stores_float16_and_loads_float32(run: Path, tmp_path: Path):
    from safetensors import safe_open

    from anymodal.pipeline import AnyModalPipeline

    half = SH.ship(run, tmp_path / "half")
    full = SH.ship(run, tmp_path / "full", dtype=torch.float32)
    for f in half.rglob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            dtypes = {fh.get_slice(k).get_dtype() for k in fh.keys()} - {"I64"}
        assert dtypes == ({"F32"} if f.parent.name == "vocoder" else {"F16"}), f
    assert _weight_bytes(half) < 0.55 * _weight_bytes(full)  # the files' JSON headers do not shrink
    assert L.directory_size(half) < L.directory_size(full)

    ref = AnyModalPipeline.from_pretrained(run / "final")
    pipe = AnyModalPipeline.from_pretrained(half)
    tensors = _floating_tensors(pipe)
    assert tensors and all(v.dtype == torch.float32 for _, v in tensors), \
        [k for k, v in tensors if v.dtype != torch.float32][:3]
    want = dict(_floating_tensors(ref))
    assert want.keys() == dict(tensors).keys()
    for k, v in tensors:  # float16 rounding, nothing more
        assert torch.allclose(v, want[k], rtol=1e-3, atol=1e-4), k
    for prompt in ("draw a red circle", "play a low sine tone of C4"):
        a, b = pipe(prompt, seed=0, progress=False), ref(prompt, seed=0, progress=False)
        assert a.token_ids == b.token_ids
        ids = ref.processor.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            la, lb = pipe.model.language_model(input_ids=ids).logits, ref.model.language_model(input_ids=ids).logits
        assert (la - lb).abs().max() < 1e-2 * lb.abs().max()


def test_the_tokenizer_knows_the_llms_context(run: Path, tmp_path: Path):
    """The llm phase and ship give the tokenizer the LLM's position limit as its model_max_length (the
    tokenizer phase's guess, smaller, made transformers warn of "indexing errors" on long chats)."""
    from transformers import AutoConfig, AutoTokenizer

    from anymodal.pipeline import AnyModalPipeline

    positions = AutoConfig.from_pretrained(run / "llm").max_position_embeddings
    assert AutoTokenizer.from_pretrained(run / "llm").model_max_length == positions
    shipped = AnyModalPipeline.from_pretrained(SH.ship(run, tmp_path / "shipped"))
    assert shipped.processor.tokenizer.model_max_length == shipped.context_length == positions


def test_ship_cli(run: Path, tmp_path: Path, capsys, monkeypatch):
    import anymodal.pipeline
    from anymodal.cli import main

    assert main(["toyworld", "ship", "--from", str(run), "--to", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "MB" in out and "float16" in out and str(tmp_path / "a") in out
    assert (tmp_path / "a" / "anymodal_index.json").is_file()
    for f in (tmp_path / "a").rglob("*.json"):  # no trace of the run's directory
        assert str(run) not in f.read_text() and "_name_or_path" not in f.read_text(), f
    monkeypatch.setattr(anymodal.pipeline, "default_model_dir", lambda: tmp_path / "default")
    assert main(["toyworld", "ship", "--from", str(run), "--dtype", "float32"]) == 0
    assert str(tmp_path / "default") in capsys.readouterr().out
    pipe = anymodal.pipeline.AnyModalPipeline.from_pretrained(tmp_path / "default")
    assert set(pipe.generators) == {Modality.IMAGE, Modality.AUDIO, Modality.VIDEO}
    assert main(["toyworld", "ship", "--from", str(tmp_path / "nothing"), "--to", str(tmp_path / "b")]) == 2
    assert "run the 'stages' phase first" in capsys.readouterr().err


def test_a_phase_follows_the_thread_share_between_steps(tmp_path: Path):
    """ThreadShare: the scheduler's file is read between steps; a new share is applied and logged."""
    assert L.ThreadShare.split(2, ["a", "b"]) == {"a": 1, "b": 1}
    assert L.ThreadShare.split(2, ["a"]) == {"a": 2}
    assert L.ThreadShare.split(5, ["a", "b"]) == {"a": 3, "b": 2}
    assert L.ThreadShare.split(1, ["a", "b"]) == {"a": 1, "b": 1}  # never 0
    share = tmp_path / "threads.json"
    share.write_text(json.dumps({"unet": 1, "other": 1}))
    control = L.RunControl(progress=False, threads=L.ThreadShare(share, "unet", current=1))
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen: list[int] = []

    def step(step: int) -> float:
        seen.append(torch.get_num_threads())
        if step == 2:  # the scheduler: "other" ended and nothing starts in its place
            tmp = tmp_path / "tmp.json"
            tmp.write_text(json.dumps({"unet": 2}))
            os.replace(tmp, share)
        return float(model(torch.ones(1, 2)).sum().detach())

    log = L.JsonlLog(tmp_path / "log.jsonl")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        L.train_loop(stage="unet", total=5, ckpt=tmp_path / "c.ckpt", modules={"m": model}, optimizer=opt,
                     gen=torch.Generator().manual_seed(0), ema=None, step_fn=step, lr_fn=lambda s: 0.1, log=log,
                     checkpoint_every=10, log_every=10, control=control)
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1, 1, 2, 2]
    assert [(r["stage"], r["step"], r["threads"]) for r in log.records() if r.get("event") == "threads"] == [
        ("unet", 3, 2)]


def test_parallel_jobs_match_a_sequential_run(run: Path, tmp_path: Path):
    """--jobs 2 --fixed-threads: phases run in two processes as their inputs allow, with the same
    weights as one by one; without --fixed-threads a phase that starts alone gets every thread."""
    phases = ["tokenizer", "image-vae", "image-generator", "encoder"]  # image-vae and encoder need nothing
    results = _train(tmp_path, phases, jobs=2, threads=1, share_idle_cores=False)
    assert [(r.phase, r.status) for r in results] == [(p, "done") for p in phases]
    for rel in ("encoder/model.safetensors", "image-generator/unet/diffusion_pytorch_model.safetensors"):
        assert (tmp_path / rel).read_bytes() == (run / rel).read_bytes(), rel
    assert not (tmp_path / "state" / "threads.json").exists()

    def threads_of(out: Path, phase: str) -> int:
        return json.loads((out / "state" / phase / "done.json").read_text())["machine"]["torch_threads"]

    assert {threads_of(tmp_path, p) for p in phases} == {1}
    shared = tmp_path / "shared"  # the audio generator needs the tokenizer: each runs alone, with both threads
    assert [r.status for r in _train(shared, ["tokenizer", "audio-generator"], jobs=2, threads=1)] == ["done"] * 2
    assert threads_of(shared, "tokenizer") == threads_of(shared, "audio-generator") == 2
    with pytest.raises(ValueError, match="jobs must be an int >= 1"):
        _train(tmp_path, phases, jobs=0)


def test_a_worker_whose_scheduler_is_gone_stops_after_a_checkpoint(tmp_path: Path):
    """RunControl.parent: a worker of a parallel run checks that its scheduler still lives; once it is
    re-parented (the scheduler was killed) it stops at its next step, with a checkpoint to resume from."""
    assert not L.RunControl(parent=os.getppid()).should_stop(1)
    control = L.RunControl(parent=os.getppid() + 1 if os.getppid() != 1 else 2)
    assert control.orphaned() and control.should_stop(1)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(_: int) -> float:
        loss = model(torch.ones(1, 2)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss)

    with pytest.raises(L.Stop, match="stopped at step 1/5"):
        L.train_loop(stage="unet", total=5, ckpt=tmp_path / "c.ckpt", modules={"m": model}, optimizer=opt,
                     gen=torch.Generator().manual_seed(0), ema=None, step_fn=step, lr_fn=lambda s: 0.1,
                     log=L.JsonlLog(tmp_path / "log.jsonl"), checkpoint_every=10, log_every=10, control=control)
    assert (tmp_path / "c.ckpt").exists()


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_killing_a_parallel_run_leaves_no_worker_training(tmp_path: Path):
    """`toyworld train --jobs 2` killed with SIGTERM ends its worker processes with it (before, they
    trained on, orphaned, and raced the next --resume for the run directory); --resume then finishes."""
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "anymodal", "toyworld", "train", "--out", str(tmp_path / "run"), "--preset", "smoke",
           "--phase", "tokenizer", "--phase", "encoder", "--jobs", "2", "--threads", "1", "--no-progress",
           "--set", "encoder.steps=100000", "--set", "encoder.checkpoint_every=20"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    ckpt = tmp_path / "run" / "state" / "encoder" / "encoder.ckpt"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert ckpt.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no checkpoint in time"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    time.sleep(2)
    alive = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert alive == [], f"worker processes still running: {alive}"
    log = tmp_path / "run" / "logs" / "encoder.jsonl"
    size = log.stat().st_size
    time.sleep(2)
    assert log.stat().st_size == size  # nothing trains on in the run directory
