"""Mutation fuzzing of what anymodal loads from disk: NExT-GPT deltas given to ``convert``, released
Hugging Face folders (LLaVA style: config.json, tokenizer files, safetensors, a weight index) and
saved chat sessions.

Every case starts from a valid file and mutates it (bytes, or the parsed JSON / tensor dict). Each
must end in one of two ways, within a time and a memory bound: the input loads (or converts) and
the result is whole, or a clear error raised by anymodal's own code names the problem. Never a
traceback from deep inside a library, a hang, a blow-up of memory, a file read from outside the
folder, or a half-written output.

The seeded cases in CI are cheap (most mutations are refused before any model is built); ``-m slow``
runs many more seeds of each. A failure found here is fixed at its cause, and its seed stays.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import resource
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from PIL import Image

from anymodal.convert.nextgpt import convert_nextgpt, load_delta
from anymodal.modality import Modality
from anymodal.pipeline import INDEX_NAME, AnyModalPipeline
from anymodal.session import ChatSession, Turn
from test_fuzz import CLEAR, OWN_CODE, _mutate, time_bound
from test_hf_systems import blip2_dir, llava_dir  # noqa: F401  (tiny released folders)
from test_nextgpt import FIX, _vicuna

TIME_S = 60
MEMORY_MB = 3072  # headroom over the process's current address space for one case
FAST = {"delta": 60, "folder": 100, "blip2": 30, "saved": 70, "session": 60}  # seeds per surface in CI (320)
SLOW = 300  # more seeds per surface under -m slow


@contextlib.contextmanager
def memory_bound(extra_mb: int = MEMORY_MB):
    """Cap the address space at its current size plus ``extra_mb``: an allocation a hostile size asks
    for fails at once (MemoryError / RuntimeError, which the case then reports) instead of swapping."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm + extra_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def outcome(fn: Callable[[], Any]) -> str:
    """``"ok"`` or ``"refused"`` (a clear error from anymodal's own code); anything else fails the case."""
    with time_bound(TIME_S), memory_bound():
        try:
            fn()
        except CLEAR as e:
            tb = e.__traceback__
            while tb.tb_next is not None:
                tb = tb.tb_next
            origin = tb.tb_frame.f_code.co_filename
            assert origin.startswith(OWN_CODE), f"{type(e).__name__} raised in {origin}, not by anymodal: {e}"
            assert 0 < len(str(e)) < 4000, f"{type(e).__name__} with a message of {len(str(e))} characters"
            return "refused"
    return "ok"


# ---------------------------------------------------------------- JSON-aware mutation
HOSTILE: list[Any] = [None, True, False, -1, 0, 1, 3, 2**31, 2**63, 10**30, 4e6, 1e308, -0.5, math.nan, math.inf,
                      "64", "", "x" * 300, [], [1], [1, 2, 3], {}, {"a": 1}, "../../etc/passwd", "/etc/passwd",
                      "\ud800", "media/../../x"]


def _nodes(node: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _nodes(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node[:20]):
            out += _nodes(v, path + (i,))
    return out


def mutate_json(obj: Any, rng: random.Random) -> Any:
    """1-3 edits of a parsed JSON value: a node replaced by a hostile value or a copy of another
    node, a key deleted, or a key added."""
    obj = copy.deepcopy(obj)
    for _ in range(rng.randint(1, 3)):
        paths = [p for p in _nodes(obj) if p]
        if not paths:
            return rng.choice(HOSTILE)
        path = rng.choice(paths)
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        op = rng.random()
        if op < 0.6:
            parent[path[-1]] = copy.deepcopy(rng.choice(HOSTILE))
        elif op < 0.75 and isinstance(parent, dict):
            del parent[path[-1]]
        elif op < 0.9:
            other = rng.choice(paths)
            node = obj
            for k in other:
                node = node[k]
            parent[path[-1]] = copy.deepcopy(node)
        elif isinstance(parent, dict):
            parent[rng.choice(["surprise", "model_type", "file", "role", "hidden_size"])] = rng.choice(HOSTILE)
    return obj


def dump(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass").decode(
        "utf-8", "replace")


def _no_leftovers(out: Path) -> None:
    """The output is whole or absent, and nothing is left beside it."""
    assert not out.exists() or (out / INDEX_NAME).is_file()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


# ============================================================================ convert: NExT-GPT deltas
@pytest.fixture(scope="module")
def vicuna(tmp_path_factory) -> Path:
    return _vicuna(tmp_path_factory.mktemp("vicuna"))


@pytest.fixture(scope="module")
def delta() -> dict[str, torch.Tensor]:
    return dict(load_delta(FIX / "pytorch_model.pt"))


def _mutate_delta(state: dict[str, torch.Tensor], rng: random.Random) -> dict[Any, Any]:
    state = dict(state)
    keys = sorted(state)
    for _ in range(rng.randint(1, 3)):
        k = rng.choice(keys)
        if k not in state:
            continue
        t = state[k]
        op = rng.randrange(9)
        if op == 0:
            del state[k]
        elif op == 1:  # a layer index anywhere, or a key NExT-GPT never had
            state[k.replace(".0.", f".{rng.choice([1, 7, 99, 3000000])}.", 1) if ".0." in k else k + ".x"] = t
        elif op == 2:
            state[k] = t.reshape(-1)
        elif op == 3:
            state[k] = t.unsqueeze(0)
        elif op == 4:
            state[k] = t.to(rng.choice([torch.int64, torch.bool, torch.uint8, torch.float64]))
        elif op == 5:
            state[k] = torch.zeros(0, *t.shape[1:], dtype=t.dtype)
        elif op == 6:
            state[k] = torch.tensor(1.0)
        elif op == 7:
            state[k] = t.t() if t.ndim == 2 else t
        else:
            state[k] = torch.full(t.shape, rng.choice([math.nan, math.inf, 1e30]))
    return state


def _delta_case(seed: int, delta, vicuna: Path, tmp_path: Path) -> str:
    rng = random.Random(f"delta-{seed}")
    src = tmp_path / "delta.pt"
    if seed % 3 == 0:  # bytes of the zip file
        src.write_bytes(_mutate((FIX / "pytorch_model.pt").read_bytes(), rng))
    else:
        torch.save(_mutate_delta(delta, rng), src)
    out = tmp_path / "out"
    result = outcome(lambda: convert_nextgpt(src, vicuna, out, progress=False, log=lambda *_: None,
                                             dtype="float32"))
    _no_leftovers(out)
    if result == "ok":
        assert (out / INDEX_NAME).is_file()
    return result


def _fifty(first: int, tmp_path: Path, case: Callable[..., Any], *args: Any) -> None:
    """The slow variants: cases ``first`` .. ``first + 49``, each in a folder of its own, removed after."""
    for s in range(first, first + 50):
        d = tmp_path / str(s)
        d.mkdir()
        case(s, *args, d)
        shutil.rmtree(d)


@pytest.mark.parametrize("seed", range(FAST["delta"]))
def test_fuzz_convert_delta(delta, vicuna, tmp_path, seed):
    _delta_case(seed, delta, vicuna, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(FAST["delta"], FAST["delta"] + SLOW, 50))
def test_fuzz_convert_delta_long(delta, vicuna, tmp_path, seed):
    _fifty(seed, tmp_path, _delta_case, delta, vicuna)


# ============================================================================ released Hugging Face folders
FOLDER_FILES = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "special_tokens_map.json")


def _safetensors_header_mutation(data: bytes, rng: random.Random) -> bytes:
    n = int.from_bytes(data[:8], "little")
    head = bytearray(data[: 8 + n])
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(head))
        head[i] = rng.randrange(256) if rng.random() < 0.7 else rng.choice(b'0123456789[]{},:"')
    return bytes(head) + data[8 + n:]


def _folder_case(seed: int, llava: Path, tmp_path: Path) -> str:
    rng = random.Random(f"folder-{seed}")
    d = tmp_path / "llava"
    shutil.copytree(llava, d)
    kind = seed % 10
    if kind < 5:  # config.json, parsed
        (d / "config.json").write_text(dump(mutate_json(json.loads((d / "config.json").read_text()), rng)))
    elif kind == 5:  # another JSON file the loaders read, parsed
        name = rng.choice([f for f in FOLDER_FILES[1:] if (d / f).is_file()])
        (d / name).write_text(dump(mutate_json(json.loads((d / name).read_text()), rng)))
    elif kind == 6:  # a JSON file's bytes
        name = rng.choice([f for f in FOLDER_FILES if (d / f).is_file()])
        (d / name).write_bytes(_mutate((d / name).read_bytes(), rng))
    elif kind == 7:  # the safetensors header
        f = d / "model.safetensors"
        f.write_bytes(_safetensors_header_mutation(f.read_bytes(), rng))
    elif kind == 8:  # a weight index, parsed and mutated
        from safetensors import safe_open

        with safe_open(str(d / "model.safetensors"), "pt") as f:
            keys = list(f.keys())
        shutil.move(str(d / "model.safetensors"), str(d / "model-00001-of-00001.safetensors"))
        index = {"metadata": {"total_size": 1}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in keys}}
        (d / "model.safetensors.index.json").write_text(dump(mutate_json(index, rng)))
    else:  # the weights file cut short, or a stray file beside it
        f = d / "model.safetensors"
        data = f.read_bytes()
        if rng.random() < 0.5:
            f.write_bytes(data[: rng.randrange(len(data))])
        else:
            (d / rng.choice(["pytorch_model.bin", "x.safetensors", "model.safetensors.index.json"])).write_bytes(
                _mutate(b'{"weight_map": {}}', rng))
    return outcome(lambda: AnyModalPipeline.from_pretrained(d))


@pytest.mark.parametrize("seed", range(FAST["folder"]))
def test_fuzz_released_folder(llava_dir, tmp_path, seed):  # noqa: F811
    _folder_case(seed, llava_dir, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(FAST["folder"], FAST["folder"] + SLOW, 50))
def test_fuzz_released_folder_long(llava_dir, tmp_path, seed):  # noqa: F811
    _fifty(seed, tmp_path, _folder_case, llava_dir)


@pytest.mark.parametrize("seed", range(FAST["blip2"]))
def test_fuzz_released_blip2_folder(blip2_dir, tmp_path, seed):  # noqa: F811
    """The same mutations on a BLIP-2 folder (a Q-Former projector and an OPT language model)."""
    _folder_case(10_000 + seed, blip2_dir, tmp_path)


# ============================================================================ saved anymodal pipelines
@pytest.fixture(scope="module")
def pipe() -> AnyModalPipeline:
    from anymodal.config import AnyModalConfig
    from conftest import CONFIGS

    torch.manual_seed(0)
    return AnyModalPipeline.from_config(AnyModalConfig.from_yaml(CONFIGS / "tiny.yaml"))


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory) -> Path:
    return pipe.save_pretrained(tmp_path_factory.mktemp("saved") / "pipe")


def _saved_case(seed: int, saved: Path, tmp_path: Path) -> str:
    rng = random.Random(f"saved-{seed}")
    d = tmp_path / "pipe"
    shutil.copytree(saved, d)
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": 1}')
    jsons = sorted(p for p in d.rglob("*.json") if p.name != INDEX_NAME)
    kind = seed % 7
    if kind < 3:  # the index, parsed
        (d / INDEX_NAME).write_text(dump(mutate_json(json.loads((d / INDEX_NAME).read_text()), rng)))
    elif kind == 3:  # a component's JSON file, parsed
        f = rng.choice(jsons)
        f.write_text(dump(mutate_json(json.loads(f.read_text()), rng)))
    elif kind == 4:  # a component's JSON file, bytes
        f = rng.choice(jsons)
        f.write_bytes(_mutate(f.read_bytes(), rng))
    elif kind == 5:  # a safetensors header
        f = rng.choice(sorted(d.rglob("*.safetensors")))
        f.write_bytes(_safetensors_header_mutation(f.read_bytes(), rng))
    else:  # a file replaced by a link out of the folder, or a stray pickle
        f = rng.choice(jsons + sorted(d.rglob("*.safetensors")))
        if rng.random() < 0.5:
            f.unlink()
            f.symlink_to(secret)
        else:
            torch.save({"w": torch.zeros(1)}, f.with_name(rng.choice(["pytorch_model.bin", "model.pt"])))
    return outcome(lambda: AnyModalPipeline.from_pretrained(d))


@pytest.mark.parametrize("seed", range(FAST["saved"]))
def test_fuzz_saved_pipeline(saved, tmp_path, seed):
    _saved_case(seed, saved, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(FAST["saved"], FAST["saved"] + SLOW, 50))
def test_fuzz_saved_pipeline_long(saved, tmp_path, seed):
    _fifty(seed, tmp_path, _saved_case, saved)


# ============================================================================ saved chat sessions
@pytest.fixture(scope="module")
def session_dir(pipe, tmp_path_factory) -> Path:
    """A session with a picture sent as a path, and a picture and a sound the model 'made'."""
    import numpy as np

    from anymodal.media import Audio

    tmp = tmp_path_factory.mktemp("session")
    picture = tmp / "sent.png"
    Image.new("RGB", (8, 8), "blue").save(picture)
    session = ChatSession(pipe, seed=3)
    session.turns += [Turn("user", "look <image>", {Modality.IMAGE: [str(picture)]}),
                      Turn("assistant", "a cat <image> <audio>",
                           {Modality.IMAGE: [Image.new("RGB", (8, 8), "red")],
                            Modality.AUDIO: [Audio(np.zeros(1600, np.float32), 16000)]}, seed=3, token_ids=[1, 2])]
    return session.save(tmp / "chat")


def _session_case(seed: int, pipe, session_dir: Path, tmp_path: Path) -> str:
    rng = random.Random(f"session-{seed}")
    d = tmp_path / "chat"
    shutil.copytree(session_dir, d)
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    kind = seed % 6
    state_file = d / "session.json"
    if kind < 3:
        state_file.write_text(dump(mutate_json(json.loads(state_file.read_text()), rng)))
    elif kind == 3:
        state_file.write_bytes(_mutate(state_file.read_bytes(), rng))
    elif kind == 4:  # a media file's bytes
        f = rng.choice(sorted((d / "media").iterdir()))
        f.write_bytes(_mutate(f.read_bytes(), rng))
    else:  # a media entry pointing elsewhere
        state = json.loads(state_file.read_text())
        entry = rng.choice([e for t in state["turns"] for es in t["media"].values() for e in es])
        entry["file"] = rng.choice([str(secret), "../secret.txt", "media/../../secret.txt", "media", "",
                                    "media/" + rng.choice(sorted(p.name for p in (d / "media").iterdir()))])
        state_file.write_text(dump(state))
    loaded: list[ChatSession] = []
    result = outcome(lambda: loaded.append(ChatSession.load(d, pipe)))
    if result == "ok":  # whatever loaded came from inside the session, and saves again
        inside = d.resolve()
        for turn in loaded[0].turns:
            for items in turn.media.values():
                for item in items:
                    if isinstance(item, str):
                        assert inside in Path(item).resolve().parents, item
        out = tmp_path / "again"
        outcome(lambda: loaded[0].save(out))
        assert not any(p.read_bytes() == b"private" for p in out.rglob("*") if p.is_file())
    return result


@pytest.mark.parametrize("seed", range(FAST["session"]))
def test_fuzz_saved_session(pipe, session_dir, tmp_path, seed):
    _session_case(seed, pipe, session_dir, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(FAST["session"], FAST["session"] + SLOW, 50))
def test_fuzz_saved_session_long(pipe, session_dir, tmp_path, seed):
    _fifty(seed, tmp_path, _session_case, pipe, session_dir)


def test_the_fuzz_cases_reach_both_outcomes(delta, vicuna, llava_dir, saved, pipe, session_dir,  # noqa: F811
                                           tmp_path):
    """A fuzz suite whose mutations are all refused (or all pass) tests one path only: a few seeds
    of each surface must load and a few must be refused."""
    seen = {"delta": set(), "folder": set(), "saved": set(), "session": set()}
    for s in range(12):
        for name, case, args in (("delta", _delta_case, (delta, vicuna)), ("folder", _folder_case, (llava_dir,)),
                                 ("saved", _saved_case, (saved,)), ("session", _session_case, (pipe, session_dir))):
            d = tmp_path / f"{name}{s}"
            d.mkdir()
            seen[name].add(case(s, *args, d))
            shutil.rmtree(d)
    assert all(v == {"ok", "refused"} for v in seen.values()), seen


def test_the_fast_suite_draws_enough_cases():
    assert sum(FAST.values()) >= 300 and set(FAST) == {"delta", "folder", "blip2", "saved", "session"}
    assert SLOW * 4 >= 1000  # -m slow: 300 more seeds of each surface but BLIP-2
