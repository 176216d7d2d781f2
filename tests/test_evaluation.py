"""anymodal eval on the benchmark tasks: every task end to end on fabricated data in its released
layout, and every metric equal to its reference implementation on fixed inputs."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("torchmetrics")
pytest.importorskip("pycocoevalcap")

from _benchdata import (TinyImageFeatures, make_audiocaps, make_clap_dir, make_clip_dir, make_coco, make_msrvtt,
                        make_vqav2)
from anymodal.evaluation import TASKS, FeatureOptions, Features, run_eval
from anymodal.evaluation import metrics as M
from anymodal.evaluation.data import read_audiocaps, read_coco_captions, read_msrvtt, read_vqav2

# Prompts the shipped toy-world model answers with a medium ("draw ...", "play ...", "show ...").
TOY_PROMPTS = {"t2i": "draw {caption}", "t2a": "play {caption}", "t2v": "show {caption}"}


@pytest.fixture(scope="module")
def pipe():
    from anymodal import AnyModalPipeline

    return AnyModalPipeline.from_pretrained()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return {"coco": make_coco(root / "coco"), "audiocaps": make_audiocaps(root / "audiocaps"),
            "msrvtt": make_msrvtt(root / "msrvtt"), "vqav2": make_vqav2(root / "vqav2"),
            "clip": make_clip_dir(root / "clip"), "clap": make_clap_dir(root / "clap")}


def test_fixtures_stay_small(data):
    total = sum(p.stat().st_size for d in data.values() for p in d.rglob("*") if p.is_file())
    assert total < 2_000_000, total


# ---------------------------------------------------------------- readers
def test_readers_read_the_released_layouts(data):
    coco = read_coco_captions(data["coco"])
    assert len(coco.items) == 5 and all(len(it.captions) == 3 and it.media.is_file() for it in coco.items)
    ac = read_audiocaps(data["audiocaps"])
    assert len(ac.items) == 4 and ac.missing_media == 1  # one clip's WAV is gone
    assert all(len(it.captions) == 2 for it in ac.items)
    vt = read_msrvtt(data["msrvtt"])
    assert sorted(it.id for it in vt.items) == ["video7010", "video7011", "video7012"]  # the train video is left out
    vqa = read_vqav2(data["vqav2"])
    assert len(vqa.items) == 4 and all(len(it.answers) == 10 for it in vqa.items)
    # the fixed order does not depend on the file's order, and the checksum covers the data
    assert [it.id for it in read_coco_captions(data["coco"]).items] == [it.id for it in coco.items]
    assert coco.checksum() == read_coco_captions(data["coco"]).checksum() != coco.checksum(coco.items[:2])


def test_bad_data_folders_get_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no COCO captions file"):
        read_coco_captions(tmp_path)
    (tmp_path / "captions_val2014.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_coco_captions(tmp_path)
    with pytest.raises(FileNotFoundError, match="--data: no such folder"):
        read_vqav2(tmp_path / "nope")
    (tmp_path / "captions_val2014.json").write_text(json.dumps({"images": [{"file_name": "x.jpg"}], "annotations": [{}]}))
    with pytest.raises(ValueError, match="COCO captions annotations are not in the released format: an entry has no "
                                         "'image_id' field"):
        read_coco_captions(tmp_path)


@pytest.mark.parametrize("task,template,ok", [
    ("t2i", "draw {caption}", True), ("t2i", "draw a cat", False), ("t2i", "{caption} {question}", False),
    ("vqa", "<image> {question}", True), ("vqa", "<image> {caption}", False), ("i2t", "<image> describe", True),
    ("i2t", "<image> {caption}", False), ("t2i", "draw {caption", False),
])
def test_prompt_templates_are_checked(task, template, ok):
    from anymodal.evaluation.tasks import check_template

    if ok:
        check_template(TASKS[task], template)
    else:
        with pytest.raises(ValueError, match="--prompt"):
            check_template(TASKS[task], template)


# ---------------------------------------------------------------- metrics equal their references
def _reference_frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    """The Fréchet distance as the original FID code computes it (scipy's sqrtm)."""
    from scipy import linalg

    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_equals_the_reference_frechet_distance_on_the_same_features():
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (24, 3, 32, 32), generator=g, dtype=torch.uint8)
    fake = (real.float() * 0.7 + 40).clamp(0, 255).to(torch.uint8)
    net = TinyImageFeatures()
    fid = M.frechet_distance(net, real, fake, batch_size=7)
    with torch.no_grad():
        f1, f2 = net(real).double().numpy(), net(fake).double().numpy()
    ref = _reference_frechet(f1, f2)
    assert ref > 0 and abs(fid - ref) <= 1e-6 * ref
    # clean-fid's and torch-fidelity's Fréchet distances on the same statistics
    from cleanfid.fid import frechet_distance as cleanfid_fd
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    clean = cleanfid_fd(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    assert abs(fid - clean) <= 1e-6 * clean
    tf = fid_statistics_to_metric(fid_features_to_statistics(torch.from_numpy(f1)),
                                  fid_features_to_statistics(torch.from_numpy(f2)), False)["frechet_inception_distance"]
    assert abs(fid - tf) <= 1e-6 * tf


def test_fad_is_the_frechet_distance_of_the_embeddings():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(30, 5, generator=g, dtype=torch.float64), torch.randn(30, 5, generator=g, dtype=torch.float64) + 0.3
    fad = M.frechet_distance(M.Embeddings(5), a.float(), b.float())
    ref = _reference_frechet(a.float().double().numpy(), b.float().double().numpy())
    assert abs(fad - ref) <= 1e-6 * ref


class _TensorFeatures(torch.nn.Module):
    """CLIPModel whose get_*_features return tensors, as torchmetrics 1.9 expects (transformers 5
    returns an output object there)."""

    def __init__(self, clip):
        super().__init__()
        self.inner, self.config = clip, clip.config

    def get_image_features(self, *a, **k):
        return M._embeds(self.inner.get_image_features(*a, **k))

    def get_text_features(self, *a, **k):
        return M._embeds(self.inner.get_text_features(*a, **k))


def test_clip_score_equals_torchmetrics(data):
    from PIL import Image
    from torchmetrics.multimodal.clip_score import CLIPScore

    from _benchdata import shape_image

    clip = M.Clip.from_dir(data["clip"])
    caps = ["a red circle", "a blue square", "a green triangle"]
    images = [shape_image(c) for c in caps]
    ours = M.clip_scores(clip, images, caps[::-1])
    metric = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(clip.model), clip.processor))
    for im, cap in zip(images, caps[::-1]):
        metric.update(torch.from_numpy(np.array(im)).permute(2, 0, 1), cap)
    assert abs(M.clip_score(ours) - float(metric.compute())) <= 1e-4
    assert isinstance(images[0], Image.Image) and ours.shape == (3,)


CAPTION_REFS = {"1": ["A man riding a horse.", "a man rides a brown horse", "someone on horseback"],
                "2": ["Two dogs play in the snow!", "dogs playing", "two puppies in the snow"],
                "3": ["A kitchen with a stove, and a fridge.", "a kitchen", "an empty kitchen with appliances"]}
CAPTION_HYPS = {"1": "a man is riding a horse", "2": "two dogs playing in snow", "3": "a cat on a bed"}


def test_cider_and_bleu_equal_pycocoevalcap_on_the_same_tokenised_captions():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    refs = M.tokenize(CAPTION_REFS, java=False)
    hyps = {k: v[0] for k, v in M.tokenize({k: [v] for k, v in CAPTION_HYPS.items()}, java=False).items()}
    corpus, items = M.caption_metrics(refs, hyps, meteor=False)
    res = {k: [v] for k, v in hyps.items()}
    cider, cider_items = Cider().compute_score(refs, res)
    bleu, bleu_items = Bleu(4).compute_score(refs, res, verbose=0)
    assert corpus["CIDEr"] == pytest.approx(100 * cider, rel=1e-12)
    assert corpus["BLEU-4"] == pytest.approx(100 * bleu[3], rel=1e-12)
    assert [items[k]["CIDEr"] for k in refs] == pytest.approx([100 * x for x in cider_items], rel=1e-12)
    assert [items[k]["BLEU-4"] for k in refs] == pytest.approx([100 * x for x in bleu_items[3]], rel=1e-12)
    assert corpus["CIDEr"] > 0 and items["1"]["CIDEr"] > items["3"]["CIDEr"]


def test_pure_python_tokenizer_matches_stanford_ptb_on_common_captions():
    if not M.java_available():
        pytest.skip("Java is not installed: Stanford's PTBTokenizer cannot run")
    caps = {**CAPTION_REFS, "4": ["The dog's ball isn't red.", "A black-and-white photo of 3.5 cats..."]}
    assert M.tokenize(caps, java=False) == M.tokenize(caps, java=True)


# The official VQA evaluation (GT-Vision-Lab/VQA a013f00, vqaEval.py) gives exactly these per-question
# accuracies; checked by running it on these cases (bench/vqa_official_check.py).
VQA_CASES = [
    ("yes", ["yes"] * 10, 1.0),
    ("Yes", ["yes"] * 10, 0.0),  # all annotators agree: nothing is normalised, case included
    ("two", ["2"] * 4 + ["two"] * 3 + ["3"] * 3, 1.0),  # number words
    ("a dog", ["dog"] * 2 + ["cat"] * 8, 0.6),  # articles; min(#/3, 1) over leave-one-out subsets
    ("t shirt", ["t-shirt"] * 3 + ["shirt"] * 7, 0.9),  # punctuation becomes a space
    ("3.5.", ["3.5"] * 5 + ["3"] * 5, 1.0),  # a period not before a digit is dropped
    ("dont", ["don't"] * 4 + ["no"] * 6, 1.0),  # contractions
    ("1,000", ["1,000"] * 2 + ["1000"] * 8, 1.0),  # a comma between digits: punctuation removed
    ("zero", ["0", "none"] + ["no"] * 8, 0.6),
    ("blue", ["blue"] + ["green"] * 9, 0.3),
    ("green", ["blue"] + ["green"] * 9, 1.0),
    ("purple", ["blue"] + ["green"] * 9, 0.0),
    ("  yes\n", ["yes"] * 9 + ["yeah"], 1.0),
    ("Beatles", ["the beatles"] * 2 + ["beatles"] * 2 + ["band"] * 6, 1.0),
    ("red and white", ["red, white"] * 2 + ["red and white"] * 2 + ["red"] * 6, 0.6),
]


@pytest.mark.parametrize("prediction,answers,expected", VQA_CASES)
def test_vqa_accuracy_equals_the_official_evaluation(prediction, answers, expected):
    assert M.vqa_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_normalisation_tables_are_the_official_ones():
    n = M.VQANormalizer.official()
    assert len(n.contractions) == 120 and n.number_words["ten"] == "10" and n.articles == {"a", "an", "the"}
    assert n("The Two dogs, running!") == "2 dogs running"


def test_bootstrap_interval_brackets_the_mean():
    lo, hi = M.bootstrap_ci([0.0, 1.0] * 50, resamples=500, seed=0)
    assert lo < 0.5 < hi and M.bootstrap_ci([1.0]) is None


# ---------------------------------------------------------------- feature networks come from local files only
def test_missing_feature_networks_name_their_flag(tmp_path):
    with pytest.raises(ValueError, match="t2i needs --fid-weights FILE: torch-fidelity's Inception"):
        M.inception_features(None)
    with pytest.raises(ValueError, match=r"needs --clip-model DIR"):
        Features.load(TASKS["t2v"], FeatureOptions())
    with pytest.raises(ValueError, match=r"needs --clap-model DIR"):
        Features.load(TASKS["t2a"], FeatureOptions())
    with pytest.raises(FileNotFoundError, match=r"--clip-model .*not a model folder"):
        Features.load(TASKS["t2v"], FeatureOptions(clip_model=str(tmp_path)))
    with pytest.raises(ValueError, match=r"t2a FAD over VGGish needs --vggish-weights FILE: .*vggish-10086976.pth"):
        Features.load(TASKS["t2a"], FeatureOptions(fad_model="vggish"))
    with pytest.raises(ValueError, match=r"--vggish-weights is for --fad-model vggish"):
        Features.load(TASKS["t2a"], FeatureOptions(fad_model="clap", vggish_weights="vggish.pth"))


class _Evil:
    def __reduce__(self):
        return (print, ("this ran code",))


def test_fid_weights_that_would_run_code_are_refused(tmp_path):
    path = tmp_path / "pt_inception.pth"
    torch.save({"w": torch.zeros(1), "x": _Evil()}, path)
    with pytest.raises(ValueError, match="not a plain PyTorch state dict"):
        M.inception_features(path)
    path.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(ValueError, match="--fid-weights"):
        M.inception_features(path)


# ---------------------------------------------------------------- every task end to end
def _features(task: str, data) -> Features:
    if task == "t2i":
        f = Features.load(TASKS[task], FeatureOptions(clip_model=str(data["clip"]), fid_features="clip"))
        f.fid, f.fid_name, f.image_size = TinyImageFeatures(), "tiny random network", 32
        return f
    return Features.load(TASKS[task], FeatureOptions(clip_model=str(data["clip"]), clap_model=str(data["clap"]),
                                                     meteor="off", video_frames=4))


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_end_to_end(task, pipe, data, tmp_path):
    t = TASKS[task]
    out = tmp_path / "out"
    summary = run_eval(task, pipe, data[t.dataset], out, limit=3, prompt=TOY_PROMPTS.get(task), model="default",
                       features=_features(task, data), bootstrap=50, progress=False)
    assert summary["n"] == 3 and summary["n_available"] >= 3 and len(summary["data_checksum"]) == 64
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 3
    assert json.loads((out / "summary.json").read_text()) == summary
    md = (out / "summary.md").read_text()
    assert f"| {task} | default |" in md
    assert ("below the full split" in md) == (summary["n_available"] + summary["missing_media"] > 3)
    expected = {"t2i": {"FID", "KID", "CLIPScore"}, "t2a": {"FAD", "CLAP score"}, "t2v": {"CLIPSIM"},
                "i2t": {"CIDEr", "BLEU-4"}, "a2t": {"CIDEr", "BLEU-4"}, "v2t": {"CIDEr", "BLEU-4"},
                "vqa": {"VQA accuracy"}}[task]
    assert expected <= set(summary["metrics"]), (summary["metrics"], summary["notes"])
    for name in expected:
        m = summary["metrics"][name]
        assert np.isfinite(m["value"]) and m["n"] == 3
    if t.kind == "generate":  # the shipped toy model answers every prompt with its medium
        assert all((out / "generation" / s["output"]).is_file() for s in scores)
    if t.kind == "caption":
        assert any("SPICE skipped" in n for n in summary["notes"]) and any("METEOR skipped" in n for n in summary["notes"])
        assert "METEOR" not in summary["metrics"]


def test_a_killed_eval_resumes_with_nothing_generated_twice(pipe, data, tmp_path):
    calls: list[str] = []

    class Counting:
        """The real pipeline, counting each prompt it generates; interrupted after its first call."""

        def __init__(self, stop_after: int | None):
            self.stop_after = stop_after

        def __getattr__(self, name):
            return getattr(pipe, name)

        def __call__(self, prompts, **kw):
            if self.stop_after is not None and len(calls) >= self.stop_after:
                raise KeyboardInterrupt
            calls.extend(prompts)
            return pipe(prompts, **kw)

    out = tmp_path / "out"
    kw = dict(prompt=TOY_PROMPTS["t2i"], features=_features("t2i", data), batch_size=2, progress=False, bootstrap=10)
    with pytest.raises(KeyboardInterrupt):
        run_eval("t2i", Counting(stop_after=2), data["coco"], out, **kw)
    assert len(calls) == 2 and not (out / "summary.json").exists()
    summary = run_eval("t2i", Counting(stop_after=None), data["coco"], out, **kw)
    assert len(calls) == 5 and len(set(calls)) == 5  # each of the 5 items generated exactly once
    assert summary["n"] == 5 and summary["metrics"]["CLIPScore"]["n"] == 5
    calls.clear()
    run_eval("t2i", Counting(stop_after=None), data["coco"], out, **kw)  # a third run only scores
    assert calls == []


def test_an_unreadable_generated_medium_is_left_out_with_its_reason(pipe, data, tmp_path):
    out = tmp_path / "out"
    kw = dict(prompt=TOY_PROMPTS["t2i"], features=_features("t2i", data), limit=4, progress=False, bootstrap=10)
    run_eval("t2i", pipe, data["coco"], out, **kw)
    first = json.loads((out / "scores.jsonl").read_text().splitlines()[0])
    (out / "generation" / first["output"]).write_bytes(b"not a png")
    summary = run_eval("t2i", pipe, data["coco"], out, **kw)  # everything is recorded: this run only scores
    assert summary["metrics"]["CLIPScore"]["n"] == summary["metrics"]["FID"]["n"] == 3
    assert any("could not be read" in n for n in summary["notes"])
    assert "cannot read a medium" in json.loads((out / "scores.jsonl").read_text().splitlines()[0])["error"]


def test_a_model_that_cannot_do_the_task_is_refused_before_generating(data, tmp_path):
    from types import SimpleNamespace

    from anymodal.evaluation.tasks import check_model
    from anymodal.modality import Modality

    class Takes:
        def __init__(self, *ms):
            self.ms = ms

        def check_takes(self, m):
            if m not in self.ms:
                raise ValueError(f"this model takes no {m.value} input")

    text_only = SimpleNamespace(generators={}, processor=Takes())
    with pytest.raises(ValueError, match="t2a needs a model that generates audio"):
        check_model(TASKS["t2a"], text_only)
    with pytest.raises(ValueError, match="v2t: this model takes no video input"):
        check_model(TASKS["v2t"], text_only)
    check_model(TASKS["vqa"], SimpleNamespace(generators={}, processor=Takes(Modality.IMAGE)))
    with pytest.raises(ValueError, match="vqa: this model takes no image input"):
        run_eval("vqa", text_only, data["vqav2"], tmp_path / "o", progress=False)
    assert not (tmp_path / "o" / "generation").exists()


def test_limit_takes_a_fixed_prefix_of_the_order(pipe, data, tmp_path):
    from anymodal.evaluation.tasks import select

    _, three = select(TASKS["vqa"], data["vqav2"], limit=3)
    ds, everything = select(TASKS["vqa"], data["vqav2"])
    assert [it.id for it in three] == [it.id for it in everything[:3]]
    with pytest.raises(ValueError, match="--limit must be a positive integer"):
        select(TASKS["vqa"], data["vqav2"], limit=0)


# ---------------------------------------------------------------- the command
def test_cli_runs_a_benchmark_task_and_keeps_the_toyworld_default(pipe, data, tmp_path, monkeypatch, capsys):
    import anymodal.commands as commands
    from anymodal.cli import main

    monkeypatch.setattr(commands, "load_pipeline", lambda *a: pipe)
    out = tmp_path / "out"
    assert main(["eval", "--task", "vqa", "--data", str(data["vqav2"]), "--out", str(out), "--limit", "2",
                 "--no-progress", "--bootstrap", "20"]) == 0
    printed = capsys.readouterr().out
    assert "| vqa | anymodal default | VQA accuracy |" in printed
    assert json.loads((out / "summary.json").read_text())["n"] == 2
    # t2i through the command, FID over the CLIP image embeddings
    assert main(["eval", "--task", "t2i", "--data", str(data["coco"]), "--out", str(tmp_path / "i"), "--limit", "3",
                 "--clip-model", str(data["clip"]), "--fid-features", "clip", "--prompt", "draw {caption}",
                 "--no-progress", "--bootstrap", "20"]) == 0
    summary = json.loads((tmp_path / "i" / "summary.json").read_text())
    assert summary["metrics"]["FID"]["features"].startswith("CLIP image embeddings") and summary["n"] == 3
    capsys.readouterr()
    # a missing feature network: one line naming the flag, before anything is generated
    assert main(["eval", "--task", "t2v", "--data", str(data["msrvtt"]), "--out", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err
    assert "--clip-model DIR" in err and not (tmp_path / "v").exists()
    assert main(["eval", "--task", "i2t", "--out", str(tmp_path / "x")]) == 2
    assert "needs --data DIR" in capsys.readouterr().err


def _tiny_vggish(path):
    """A VGGish weights file in torchvggish's key layout, at tiny widths, random weights."""
    from anymodal.evaluation.vggish import VGGish

    torch.manual_seed(0)
    torch.save(VGGish(channels=(2, 4, 4, 4, 8, 8), hidden=16, embedding_size=8).state_dict(), path)
    return path


def test_t2a_fad_over_vggish_through_the_command(pipe, data, tmp_path, monkeypatch, capsys):
    import anymodal.commands as commands
    from anymodal.cli import main

    monkeypatch.setattr(commands, "load_pipeline", lambda *a: pipe)
    weights = _tiny_vggish(tmp_path / "vggish-10086976.pth")
    base = ["eval", "--task", "t2a", "--data", str(data["audiocaps"]), "--limit", "3", "--prompt", "play {caption}",
            "--no-progress", "--bootstrap", "20"]
    assert main([*base, "--out", str(tmp_path / "a"), "--vggish-weights", str(weights)]) == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    fad = summary["metrics"]["FAD"]
    assert np.isfinite(fad["value"]) and fad["value"] > 0 and fad["n"] == 3
    assert fad["features"].startswith("VGGish") and fad["embeddings"]["reference"] == 3  # one 0.96 s example per 1 s clip
    assert fad["embeddings"]["generated"] >= 3
    assert "CLAP score" not in summary["metrics"] and any("CLAP score skipped" in n for n in summary["notes"])
    assert summary["options"]["vggish_weights"] == str(weights)
    assert "- FAD over VGGish" in (tmp_path / "a" / "summary.md").read_text()
    # with a CLAP folder too: CLAP score beside FAD over VGGish; the same generated clips, the same FAD
    assert main([*base, "--out", str(tmp_path / "a"), "--vggish-weights", str(weights), "--clap-model",
                 str(data["clap"])]) == 0
    both = json.loads((tmp_path / "a" / "summary.json").read_text())["metrics"]
    assert both["FAD"]["value"] == pytest.approx(fad["value"], rel=1e-12) and np.isfinite(both["CLAP score"]["value"])
    # FAD over CLAP is still there, and named as such
    assert main([*base, "--out", str(tmp_path / "a"), "--fad-model", "clap", "--clap-model", str(data["clap"])]) == 0
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["metrics"]["FAD"]["features"].startswith("CLAP")
    capsys.readouterr()
    # missing weights: one line naming the flag and where the weights come from, exit 2, nothing written
    assert main([*base, "--out", str(tmp_path / "b"), "--fad-model", "vggish"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--vggish-weights FILE" in err and "vggish-10086976.pth" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b").exists()
    (tmp_path / "bad.pth").write_bytes(b"no")
    assert main([*base, "--out", str(tmp_path / "b"), "--vggish-weights", str(tmp_path / "bad.pth")]) == 2
    assert "--vggish-weights" in capsys.readouterr().err and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_give_the_same_scores(pipe, data, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import anymodal

    model = Path(anymodal.__file__).parent / "assets" / "default"
    single = run_eval("i2t", pipe, data["coco"], tmp_path / "one", features=_features("i2t", data), progress=False,
                      bootstrap=50, batch_size=2)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "anymodal", "eval", "--task", "i2t", "--data", str(data["coco"]), "--out", str(tmp_path / "two"),
           "--model", str(model), "--batch-size", "2", "--meteor", "off", "--bootstrap", "50", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["n"] == single["n"] == 5
    for name in ("CIDEr", "BLEU-4"):
        assert two["metrics"][name]["value"] == pytest.approx(single["metrics"][name]["value"], rel=1e-9)
    one_items = (tmp_path / "one" / "scores.jsonl").read_text().splitlines()
    two_items = (tmp_path / "two" / "scores.jsonl").read_text().splitlines()
    assert [json.loads(a)["caption"] for a in one_items] == [json.loads(b)["caption"] for b in two_items]


@pytest.mark.slow
def test_meteor_runs_where_java_is_present():
    if not M.java_available():
        pytest.skip("Java is not installed")
    from pycocoevalcap.meteor.meteor import Meteor

    refs = M.tokenize(CAPTION_REFS, java=True)
    hyps = {k: v[0] for k, v in M.tokenize({k: [v] for k, v in CAPTION_HYPS.items()}, java=True).items()}
    corpus, items = M.caption_metrics(refs, hyps, meteor=True)
    score, per = Meteor().compute_score(refs, {k: [v] for k, v in hyps.items()})
    assert corpus["METEOR"] == pytest.approx(100 * score) and items["1"]["METEOR"] == pytest.approx(100 * per[0])


@pytest.mark.slow
def test_inception_fid_path_loads_a_local_weights_file(tmp_path, monkeypatch):
    """The --fid-weights path end to end, with random weights in torch-fidelity's own key format
    (the real file cannot be fetched here): loaded safely, 2048 features, a finite FID."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi
    from torchmetrics.image.fid import NoTrainInceptionV3

    from _benchdata import shape_image

    with monkeypatch.context() as m:  # build the network without its download, keep its random init
        m.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(tfi.FeatureExtractorInceptionV3.state_dict(net), path)
    feature = M.inception_features(path)
    real = M.images_to_uint8([shape_image(c) for c in ("a red circle", "a blue square", "a green triangle")], 299)
    fake = M.images_to_uint8([shape_image(c, offset=3) for c in ("a red square", "a blue circle", "a yellow circle")], 299)
    with torch.no_grad():
        assert feature(real).shape == (3, 2048)
    assert np.isfinite(M.frechet_distance(feature, real, fake))


@pytest.mark.slow
def test_a_killed_eval_process_resumes_with_nothing_generated_twice(data, tmp_path):
    """SIGKILL mid-run, then the same command: the recorded items are skipped, the rest generated once."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from collections import Counter

    captions = [f"a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle")] * 2
    coco, n = make_coco(tmp_path / "coco", captions), len(captions)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "anymodal", "eval", "--task", "i2t", "--data", str(coco), "--out", str(out),
           "--batch-size", "1", "--meteor", "off", "--no-progress", "--bootstrap", "10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = out / "generation" / "results.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if results.is_file() and results.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = results.read_bytes().count(b"\n")
    assert 2 <= before < n
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{n - before} generated, 0 failed, {before} skipped" in run.stderr
    recs = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(recs) == n and Counter(r["key"] for r in recs).most_common(1)[0][1] == 1
    assert json.loads((out / "summary.json").read_text())["metrics"]["CIDEr"]["n"] == n


def test_a_reply_is_read_as_its_first_line_without_media_placeholders():
    from anymodal.evaluation.tasks import _reply_text

    assert _reply_text("  a red  circle <image>\nand more") == "a red circle"
    assert _reply_text("<video>\n\n yes ") == "yes" and _reply_text(None) == ""
