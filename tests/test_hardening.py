"""Issue 24, files, trust and loading: each defect found by probing as a hostile user would, kept
as a regression case. One rule per family:

- nothing outside a model or session folder is read unless the user named it
  (``anymodal.loading.confined``, ``check_links_inside``, ``hf_systems.read_weight_index``);
- no existing folder or file anymodal did not write is replaced (``anymodal.utils.check_replaceable``);
- every size a config gives is bounded and checked against the weights before anything is
  allocated (``hf_systems.check_config_sizes``, ``build_checked``; the converter's layer indices);
- a bad file is one line naming the file or field (exit 2 from the CLI).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from anymodal.cli import main as cli_main
from anymodal.config import AnyModalConfig
from anymodal.convert.nextgpt import ConversionError, convert_nextgpt, load_delta
from anymodal.modality import Modality
from anymodal.pipeline import INDEX_NAME, AnyModalPipeline
from anymodal.session import ChatSession, Turn
from conftest import CONFIGS
from test_fuzz import refused, time_bound
from test_fuzz_loading import memory_bound, pipe, saved  # noqa: F401  (the tiny pipeline and its saved copy)
from test_hf_systems import blip2_dir, llava_dir  # noqa: F401  (tiny released folders, built once per module)
from test_nextgpt import FIX, _vicuna

DELTA = FIX / "pytorch_model.pt"


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.fixture(scope="module")
def vicuna(tmp_path_factory) -> Path:
    return _vicuna(tmp_path_factory.mktemp("vicuna"))


def _convert(out: Path, llm: Path, delta: Path = DELTA, **kw) -> Path:
    return convert_nextgpt(delta, llm, out, progress=False, log=lambda *_: None, **kw)


def _convert_cli(out: Path, llm: Path, *extra: str, delta: Path = DELTA) -> int:
    return cli_main(["convert", "nextgpt", str(delta), "--llm", str(llm), "--out", str(out), "--no-progress", *extra])


# ============================================================================ 1. nothing is replaced
def test_convert_refuses_a_folder_it_did_not_write_and_keeps_it(tmp_path, vicuna, capsys):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.txt").write_text("four years of work")
    assert _convert_cli(out, vicuna) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "not one anymodal wrote" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert (out / "thesis.txt").read_text() == "four years of work" and _siblings(out) == ["thesis"]


def test_convert_refuses_to_replace_its_own_base_model(tmp_path, vicuna, capsys):
    before = sorted(p.name for p in vicuna.iterdir())
    for extra in ([], ["--overwrite"]):  # not even when asked to overwrite: the output refers to it
        assert _convert_cli(vicuna, vicuna, *extra) == 2
        assert "which the output uses" in capsys.readouterr().err
    assert sorted(p.name for p in vicuna.iterdir()) == before
    assert _convert_cli(vicuna.parent, vicuna, "--overwrite") == 2  # nor a folder holding it


def test_convert_refuses_a_file_and_hides_nothing(tmp_path, vicuna, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    for extra in ([], ["--overwrite"]):
        assert _convert_cli(out, vicuna, *extra) == 2
        assert "is a file" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    assert _siblings(out) == ["notes.txt"]  # no .notes.txt.old-*, no half-written output


def test_convert_replaces_its_own_earlier_output_and_overwrites_when_asked(tmp_path, vicuna):
    out = tmp_path / "nextgpt"
    _convert(out, vicuna)
    first = (out / INDEX_NAME).read_text()
    _convert(out, vicuna)  # a converted folder is anymodal's: replaced without asking
    assert (out / INDEX_NAME).read_text() == first
    (out / "thesis.txt").write_text("x")  # something anymodal did not write is now in it
    with pytest.raises(FileExistsError, match="holds files anymodal did not write.*thesis.txt"):
        _convert(out, vicuna)
    _convert(out, vicuna, overwrite=True)
    assert not (out / "thesis.txt").exists() and (out / INDEX_NAME).is_file()


def test_save_pretrained_refuses_a_foreign_folder_or_a_file(pipe, tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "holiday.jpg").write_bytes(b"jpeg")
    with pytest.raises(FileExistsError, match="save_pretrained:.*not one anymodal wrote.*overwrite=True"):
        pipe.save_pretrained(d)
    assert [p.name for p in d.iterdir()] == ["holiday.jpg"]
    f = tmp_path / "model.txt"
    f.write_text("x")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="is a file"):
            pipe.save_pretrained(f, overwrite=overwrite)
    assert f.read_text() == "x" and _siblings(d) == ["model.txt", "photos"]
    pipe.save_pretrained(d, overwrite=True)
    assert (d / INDEX_NAME).is_file() and not (d / "holiday.jpg").exists()
    pipe.save_pretrained(d)  # its own earlier save: replaced
    empty = tmp_path / "empty"
    empty.mkdir()
    pipe.save_pretrained(empty)


def test_save_pretrained_never_replaces_a_component_it_refers_to(tmp_path):
    """A pipeline whose frozen LLM is loaded from a local folder is saved with a reference to it
    (token rows on a base): saving over that folder, or a folder holding it, is refused."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = AnyModalConfig.from_yaml(CONFIGS / "tiny.yaml").to_dict()
    base = tmp_path / "models" / "base"
    AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in cfg["llm"]["config"].items()
                                                    if k != "model_type"})).save_pretrained(base)
    cfg["llm"].pop("config")
    cfg["llm"]["model"] = str(base)
    pipe = AnyModalPipeline.from_config(AnyModalConfig.from_dict(cfg))
    before = sorted(p.name for p in base.iterdir())
    for target in (base, base.parent):
        with pytest.raises(ValueError, match="which the output uses"):
            pipe.save_pretrained(target, overwrite=True)
    assert sorted(p.name for p in base.iterdir()) == before
    saved = pipe.save_pretrained(tmp_path / "mine")
    assert json.loads((saved / INDEX_NAME).read_text())["components"]["llm"]["base"] == str(base.resolve())


def test_a_symlinked_target_is_not_replaced(pipe, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.txt").write_text("a")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(FileExistsError, match="symbolic link"):
        pipe.save_pretrained(tmp_path / "link", overwrite=True)
    assert (real / "a.txt").read_text() == "a" and (tmp_path / "link").is_symlink()


def test_session_save_refuses_a_foreign_folder(pipe, tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "cv.pdf").write_bytes(b"%PDF")
    session = ChatSession(pipe)
    with pytest.raises(FileExistsError, match="session directory.*not one anymodal wrote"):
        session.save(d)
    assert [p.name for p in d.iterdir()] == ["cv.pdf"]
    session.save(tmp_path / "s")
    session.save(tmp_path / "s")  # its own earlier save: replaced


def test_merge_lora_refuses_a_foreign_out_before_loading(tmp_path, saved, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("k")
    assert cli_main(["merge-lora", str(saved), "--out", str(out)]) == 2
    assert "merge-lora --out" in capsys.readouterr().err and (out / "keep.txt").exists()


# ============================================================================ 2. session media stay inside the session
def _session_with_picture(pipe, tmp_path: Path) -> Path:
    picture = tmp_path / "in.png"
    Image.new("RGB", (8, 8), "red").save(picture)
    session = ChatSession(pipe)
    session.turns.append(Turn("user", "<image>", {Modality.IMAGE: [str(picture)]}))
    return session.save(tmp_path / "chat")


def _set_file(d: Path, value) -> None:
    state = json.loads((d / "session.json").read_text())
    state["turns"][0]["media"]["image"][0]["file"] = value
    (d / "session.json").write_text(json.dumps(state))


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink", "dir-symlink", "not-a-string", "nul"])
def test_session_media_outside_the_session_are_refused(pipe, tmp_path, how):
    d = _session_with_picture(pipe, tmp_path)
    private = tmp_path / "private.txt"
    private.write_text("my secrets")
    if how == "absolute":
        _set_file(d, str(private))
    elif how == "dotdot":
        _set_file(d, "../private.txt")
    elif how == "symlink":
        media = next((d / "media").iterdir())
        media.unlink()
        media.symlink_to(private)
    elif how == "dir-symlink":
        shutil.rmtree(d / "media")
        (d / "media").symlink_to(tmp_path)
        _set_file(d, "media/private.txt")
    elif how == "not-a-string":
        _set_file(d, ["media"])
    else:
        _set_file(d, "media/x\0.png")
    refused(lambda: ChatSession.load(d, pipe), r"session\.json: (image medium file.*(must be a relative path inside|"
                                               r"leaves) the session directory|turns\[0\]\.media\.image\[0\] must be)")


def test_a_loaded_session_saves_again(pipe, tmp_path):
    d = _session_with_picture(pipe, tmp_path)
    again = ChatSession.load(d, pipe)
    again.save(tmp_path / "again")
    assert len(list((tmp_path / "again" / "media").iterdir())) == 1


# ============================================================================ 3. saved pipelines: no links out
@pytest.mark.parametrize("rel", ["llm/model.safetensors", "processor/tokenizer_config.json",
                                 "generators/image/unet/config.json", "encoders/imagebind"])
def test_saved_pipeline_links_leading_outside_are_refused(saved, tmp_path, rel):
    d = tmp_path / "copy"
    shutil.copytree(saved, d)
    outside = tmp_path / "elsewhere"
    shutil.move(str(d / rel), str(outside))
    (d / rel).symlink_to(outside)
    refused(lambda: AnyModalPipeline.from_pretrained(d), "a symbolic link to .*which leaves the model directory")


def test_saved_pipeline_links_inside_it_still_load(saved, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(saved, d)
    shutil.move(str(d / "config.yaml"), str(d / "config-real.yaml"))
    (d / "config.yaml").symlink_to("config-real.yaml")
    assert isinstance(AnyModalPipeline.from_pretrained(d), AnyModalPipeline)


def test_a_hub_cache_snapshot_of_a_saved_pipeline_loads(saved, tmp_path):
    """huggingface_hub keeps <repo>/snapshots/<rev>/<file> as links into <repo>/blobs/: those are the
    snapshot's own files."""
    repo = tmp_path / "models--me--tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    for k, f in enumerate(sorted(p for p in saved.rglob("*") if p.is_file())):
        blob = repo / "blobs" / f"blob{k}"
        shutil.copy(f, blob)
        link = snap / f.relative_to(saved)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    assert isinstance(AnyModalPipeline.from_pretrained(snap), AnyModalPipeline)
    (repo / "secret.json").write_text("{}")
    (snap / "processor" / "tokenizer_config.json").unlink()
    (snap / "processor" / "tokenizer_config.json").symlink_to(repo / "secret.json")
    refused(lambda: AnyModalPipeline.from_pretrained(snap), "which leaves the model directory")


# ============================================================================ 4, 5, 15, 16. released folders
def _shard(folder: Path, rel: str) -> None:
    """Move model.safetensors to ``rel`` (relative to the folder) and write an index pointing at it."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    target = folder / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(folder / "model.safetensors"), str(target))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {k: rel for k in keys}}))


def test_a_weight_index_inside_the_folder_loads(llava_dir, tmp_path):
    d = tmp_path / "llava"
    shutil.copytree(llava_dir, d)
    _shard(d, "model-00001-of-00001.safetensors")
    assert isinstance(AnyModalPipeline.from_pretrained(d), AnyModalPipeline)


@pytest.mark.parametrize("rel, match", [("../outside/model.safetensors", "leaves the checkpoint folder"),
                                        ("/tmp/model.safetensors", "must be a relative path inside")])
def test_a_weight_index_leading_outside_is_refused(llava_dir, tmp_path, rel, match):
    d = tmp_path / "llava"
    shutil.copytree(llava_dir, d)
    _shard(d, "../outside/model.safetensors")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: rel for k in index["weight_map"]}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(lambda: AnyModalPipeline.from_pretrained(d), match)
    # the same folder named in a YAML config's hf-vision encoder
    from anymodal.encoders import HFVisionEncoder

    refused(lambda: HFVisionEncoder.from_config({}, ["image"], pretrained=str(d)), match)


def test_a_yaml_config_cannot_read_a_tower_from_outside_its_folder(llava_dir, tmp_path):  # noqa: F811
    """Issue 24 item 4 as reported: a YAML config whose hf-vision ``pretrained`` folder has an index
    mapping to ``../outside/model.safetensors``."""
    import yaml

    from anymodal.hf_systems import config_from_hf

    tower = tmp_path / "tower"
    shutil.copytree(llava_dir, tower)
    _shard(tower, "../outside/model.safetensors")
    cfg = config_from_hf(llava_dir).to_dict()
    cfg["encoders"]["vision"]["pretrained"] = str(tower)
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(cfg))
    refused(lambda: AnyModalPipeline.from_pretrained(tmp_path / "model.yaml"),
            r"weight_map: '\.\./outside/model\.safetensors' leaves the checkpoint folder")


def test_a_weight_index_may_name_only_safetensors_files_in_the_folder(llava_dir, tmp_path):  # noqa: F811
    """transformers torch.loads whatever an index names: a .bin listed there would be a pickle read past
    the refusal."""
    d = tmp_path / "llava"
    shutil.copytree(llava_dir, d)
    _shard(d, "model-00001-of-00001.safetensors")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    for name, match in (("weights.bin", "not a .safetensors file"), ("gone.safetensors", "not a file in")):
        index["weight_map"] = {k: name for k in index["weight_map"]}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
        if name.endswith(".bin"):
            torch.save({}, d / name)
        refused(lambda: AnyModalPipeline.from_pretrained(d, allow_pickle=True), match)


def test_a_decoy_safetensors_does_not_let_a_pickle_load(llava_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "llava"
    shutil.copytree(llava_dir, d)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    save_file({"x": torch.zeros(1)}, str(d / "decoy.safetensors"))
    refused(lambda: AnyModalPipeline.from_pretrained(d), r"pickle files \(pytorch_model\.bin\)")
    assert isinstance(AnyModalPipeline.from_pretrained(d, allow_pickle=True), AnyModalPipeline)


class _Payload:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_code_payload_under_allow_pickle_is_one_line_and_never_runs(llava_dir, tmp_path, capsys):
    d = tmp_path / "llava"
    shutil.copytree(llava_dir, d)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Payload(str(marker))}))
    refused(lambda: AnyModalPipeline.from_pretrained(d, allow_pickle=True),
            r"pytorch_model\.bin as plain tensors.*Python objects")
    assert cli_main(["generate", "hi", "--model", str(d), "--allow-pickle", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pytorch_model.bin" in err and not marker.exists()


def test_a_code_payload_in_a_saved_pipeline_under_allow_pickle(saved, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(saved, d)
    (d / "llm" / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (d / "llm" / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    refused(lambda: AnyModalPipeline.from_pretrained(d, allow_pickle=True), r"llm/pytorch_model\.bin")
    assert not marker.exists()


def _edit_config(folder: Path, change) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    change(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, match", [
    (lambda c: c["text_config"].update(hidden_size="64"), r"text_config\.hidden_size must be a whole number.*\"64\""),
    (lambda c: c["text_config"].update(hidden_size=[64]), r"text_config\.hidden_size must be a whole number"),
    (lambda c: c["vision_config"].update(num_hidden_layers=True), r"vision_config\.num_hidden_layers"),
    (lambda c: c["vision_config"].update(patch_size=0), r"vision_config\.patch_size"),
], ids=["string", "list", "bool", "zero"])
def test_a_config_size_of_the_wrong_type_names_the_field(llava_dir, tmp_path, capsys, change, match):
    d = tmp_path / "llava"
    shutil.copytree(llava_dir, d)
    _edit_config(d, change)
    refused(lambda: AnyModalPipeline.from_pretrained(d), rf"config\.json: {match}")
    assert cli_main(["generate", "hi", "--model", str(d), "--out", str(tmp_path / "o")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("name, content, match", [
    ("config.json", "not json", r"config\.json is not valid JSON"),
    ("config.json", "[1]", r"config\.json must hold a JSON object"),
    ("tokenizer_config.json", "{oops", r"tokenizer_config\.json is not valid JSON"),
    ("model.safetensors.index.json", '{"metadata": {}, "weight_map": [1]}', r"weight_map must be an object"),
    ("model.safetensors.index.json", '{"weight_map": {}}', r"needs a \"metadata\" object"),
    ("model.safetensors.index.json", "nope", r"model\.safetensors\.index\.json is not valid JSON"),
])
def test_a_broken_json_file_is_named(llava_dir, tmp_path, name, content, match):
    d = tmp_path / "llava"
    shutil.copytree(llava_dir, d)
    (d / name).write_text(content)
    refused(lambda: AnyModalPipeline.from_pretrained(d), match)


# ============================================================================ 7, 8. sizes checked before allocating
@pytest.mark.parametrize("change, match", [
    (lambda c: c["vision_config"].update(image_size=4_000_000), r"vision_config\.image_size must be a whole number"),
    (lambda c: c["text_config"].update(vocab_size=2_000_000_000), r"text_config\.vocab_size must be"),
    (lambda c: c["text_config"].update(num_hidden_layers=1_000_000), r"text_config\.num_hidden_layers must be"),
    (lambda c: c["vision_config"].update(num_hidden_layers=1_000_000), r"vision_config\.num_hidden_layers must be"),
    # within the bounds, but more than the weights hold: caught on the meta device, before allocation
    (lambda c: c["vision_config"].update(image_size=1024), r"position_embedding.*has shape \(17, 16\).*\(65537, 16\)"),
    (lambda c: c["vision_config"].update(image_size=4096), r"config\.json gives input_projector\.num_tokens must be at "
                                                           r"most 65536, got 1048576"),
    (lambda c: c["text_config"].update(vocab_size=1_000_000), r"embed_tokens.weight.*\(1000000, 32\).*\(400, 32\)"),
    (lambda c: c["text_config"].update(num_hidden_layers=1000), r"lacks \d+ weight\(s\) its config\.json asks for"),
    (lambda c: c["vision_config"].update(num_hidden_layers=1000), r"lacks \d+ of the \d+ weights"),
], ids=["image-size-4e6", "vocab-2e9", "text-layers-1e6", "vision-layers-1e6", "image-size-1024", "image-size-4096",
         "vocab-1e6",
        "text-layers-1000", "vision-layers-1000"])
def test_config_sizes_are_bounded_and_checked_against_the_weights(llava_dir, tmp_path, change, match):
    d = tmp_path / "llava"
    shutil.copytree(llava_dir, d)
    _edit_config(d, change)
    with time_bound(60), memory_bound(1024):  # an allocation of the asked-for size would fail, not pass
        refused(lambda: AnyModalPipeline.from_pretrained(d), match)


@pytest.mark.parametrize("change, match", [
    (lambda c: c["qformer_config"].update(num_hidden_layers=1_000_000), r"qformer_config\.num_hidden_layers must be"),
    (lambda c: c["qformer_config"].update(num_hidden_layers=1000), r"input_projectors\.image.*lacks \d+ of the"),
    (lambda c: c["qformer_config"].update(hidden_size=8192, num_attention_heads=2),
     r"input_projectors\.image: weight .* has shape \(.*16\).*8192"),
    (lambda c: c.update(num_query_tokens=10_000), r"query_tokens.*has shape \(1, \d+, 16\).*\(1, 10000, 16\)"),
], ids=["qformer-layers-1e6", "qformer-layers-1000", "qformer-hidden-8192", "query-tokens-10000"])
def test_qformer_sizes_are_checked_before_allocating(blip2_dir, tmp_path, change, match):  # noqa: F811
    d = tmp_path / "blip2"
    shutil.copytree(blip2_dir, d)
    _edit_config(d, change)
    with time_bound(60), memory_bound(1024):
        refused(lambda: AnyModalPipeline.from_pretrained(d), match)


def test_a_huge_layer_index_in_a_nextgpt_delta_is_refused_at_once(tmp_path, vicuna):
    state = dict(load_delta(DELTA))
    key = "gen_text_hidden_fcs.0.tfm.decoder.layers.3000000.norm1.weight"
    state[key] = torch.zeros(1)
    torch.save(state, tmp_path / "big.pt")
    with time_bound(30):
        with pytest.raises(ConversionError, match=r"gen_text_hidden_fcs\.0\.tfm\.decoder: layer indices.*3000000"):
            _convert(tmp_path / "out", vicuna, delta=tmp_path / "big.pt")
    assert not (tmp_path / "out").exists()


def test_a_gap_in_layer_indices_is_refused(tmp_path, vicuna):
    state = dict(load_delta(DELTA))
    prefix = "gen_text_hidden_fcs_audio.0.tfm.encoder.layers."
    for k in [k for k in state if k.startswith(prefix + "0.")]:
        state[k.replace(prefix + "0.", prefix + "7.")] = state.pop(k)
    torch.save(state, tmp_path / "gap.pt")
    with pytest.raises(ConversionError, match=r"tfm\.encoder: layer indices .*not 0\.\."):
        _convert(tmp_path / "out", vicuna, delta=tmp_path / "gap.pt")


@pytest.mark.parametrize("change, match", [
    (lambda p: p.update(ffn_dim=2**63), r"output_projector\.ffn_dim must be at most"),
    (lambda p: p.update(num_layers=1_000_000), r"output_projector\.num_layers must be at most 1024"),
    (lambda p: p.update(num_layers=1000), r"output_projectors\[image\]: .* has no 'decoders\.prompt_embeds\.layers"
                                          r"\.\d+\..*more layers or parts than the weights hold"),
    (lambda p: p.update(ffn_dim=1 << 20), r"output_projectors\[image\]: .* the config asks for \(1048576, "),
], ids=["ffn-2e63", "layers-1e6", "layers-1000", "ffn-1M"])
def test_saved_projector_sizes_are_checked_before_allocating(saved, tmp_path, change, match):
    """A saved pipeline's index config gives the projectors' sizes: bounded, then compared with the
    projector files' headers on the meta device, before the real modules are built."""
    d = tmp_path / "copy"
    shutil.copytree(saved, d)
    index = json.loads((d / INDEX_NAME).read_text())
    change(index["config"]["output_projectors"]["image"])
    (d / INDEX_NAME).write_text(json.dumps(index))
    with time_bound(60), memory_bound(1024):
        refused(lambda: AnyModalPipeline.from_pretrained(d), match)


# ============================================================================ 12, 13, 15, 20. convert's inputs
def test_an_empty_delta_is_one_line(tmp_path, vicuna, capsys):
    (tmp_path / "empty.pt").write_bytes(b"")
    assert _convert_cli(tmp_path / "out", vicuna, delta=tmp_path / "empty.pt") == 2
    err = capsys.readouterr().err
    assert "empty.pt" in err and "the file is empty" in err and len(err.strip().splitlines()) == 1


def test_an_integer_key_in_a_delta_is_named(tmp_path, vicuna):
    state = dict(load_delta(DELTA))
    state[1] = torch.zeros(1)
    torch.save(state, tmp_path / "intkey.pt")
    with pytest.raises(ConversionError, match="key 1 is a int, not a string"):
        _convert(tmp_path / "out", vicuna, delta=tmp_path / "intkey.pt")


@pytest.mark.parametrize("extra, match", [
    (["--output-heads", "0"], "--output-heads must be a whole number from 1"),
    (["--output-heads", "-3"], "--output-heads must be a whole number from 1"),
    (["--output-heads", "7"], "not divisible by 7 heads"),
    (["--imagebind-preset", "nonsense"], "--imagebind-preset 'nonsense' is not an ImageBind preset; available: "),
    (["--image-generator", "../../etc/nothing"], "--image-generator '../../etc/nothing': no such directory, and not a "
                                                 "hub id"),
    (["--image-generator", "/"], "--image-generator /: not a diffusers pipeline directory"),
    (["--audio-generator", "/no/such/dir"], "--audio-generator '/no/such/dir': no such directory"),
    (["--video-generator", str(DELTA)], "--video-generator .*: a file"),
])
def test_convert_checks_its_options_before_writing(tmp_path, vicuna, capsys, extra, match):
    import re

    assert _convert_cli(tmp_path / "out", vicuna, *extra) == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


# ============================================================================ 19. a generator that does not make its modality
def test_a_saved_generator_of_the_wrong_modality_says_so(saved, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(saved, d)
    index = json.loads((d / INDEX_NAME).read_text())
    index["config"]["generators"]["audio"]["type"] = "stable-diffusion"
    (d / INDEX_NAME).write_text(json.dumps(index))
    refused(lambda: AnyModalPipeline.from_pretrained(d),
            r"generators\.audio\.type: the 'stable-diffusion' generator makes image, not audio; audio generator "
            r"types: .*audioldm")
