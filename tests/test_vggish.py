"""anymodal's VGGish (FAD's feature network) against the reference torchvggish, through stored fixtures.

The fixtures were made by ``tests/fixtures/make_reference_vggish.py`` from harritaylor/torchvggish
f3f9096 (see ``vggish_reference.json``): its NumPy front end ``waveform_to_examples`` and its
``VGG`` module at reduced widths with fixed random weights (``vggish_tiny.safetensors``, in the
reference's key format), run on the int16 clips stored beside them. The network is compared in
float64 (no CPU rounding enters) and, end to end as the FAD code calls it, in float32 (1e-5
relative to the largest value).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from anymodal.evaluation import vggish as V

FIXTURES = Path(__file__).parent / "fixtures"
META = json.loads((FIXTURES / "vggish_reference.json").read_text())
WEIGHTS = FIXTURES / META["weights"]
CASES = META["cases"]
RESAMPLED = [name for name, c in CASES.items() if c["sample_rate"] != V.SAMPLE_RATE]
WITH_EXAMPLES = [name for name, c in CASES.items() if c["examples"]]

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "vggish_reference.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def net64() -> V.VGGish:
    return V.VGGish.from_file(WEIGHTS).double()


def _wave(ref, name: str) -> np.ndarray:
    return ref[f"inputs/{name}"] / 32768.0  # as the FAD code reads PCM16 WAVs


def _rel(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.shape == theirs.shape, f"shape {ours.shape} vs reference {theirs.shape}"
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))


def test_fixture_records_the_reference():
    assert META["reference"]["repo"] == "harritaylor/torchvggish"
    assert META["reference"]["commit"].startswith("f3f9096")
    assert set(META["reference"]["files"]) >= {"torchvggish/vggish.py", "torchvggish/vggish_input.py",
                                               "torchvggish/mel_features.py"}


def test_full_size_layout_is_the_released_one():
    """Every parameter name and shape of the full-size network equals the reference's, which
    is the layout of vggish-10086976.pth."""
    with torch.device("meta"):
        ours = {k: list(v.shape) for k, v in V.VGGish().state_dict().items()}
    assert ours == META["full_size_layout"]


def test_front_end_constants_are_vggish_params():
    assert (V.WINDOW, V.HOP, V.FFT, V.MIN_SAMPLES) == (400, 160, 512, 15600)
    m = V.mel_matrix()
    assert m.shape == (257, 64) and not m[0].any() and (m >= 0).all()


@pytest.mark.parametrize("name", RESAMPLED)
def test_resampling_equals_resampy_kaiser_best(ref, name):
    wave = _wave(ref, name)
    ours = V.resample(wave.mean(1) if wave.ndim > 1 else wave, CASES[name]["sample_rate"], V.SAMPLE_RATE)
    theirs = ref[f"resampled/{name}"]  # stored as float32
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1e-6


def test_resampling_table_is_kaiser_best():
    table = V._kaiser_best()
    assert table.shape == (409601,) and table[0] == V.RESAMPLE_ROLLOFF and abs(table[-1]) < 1e-7


@pytest.mark.parametrize("name", list(CASES))
def test_examples_equal_waveform_to_examples(ref, name):
    ours = V.waveform_to_examples(_wave(ref, name), CASES[name]["sample_rate"])
    theirs = ref[f"examples/{name}"]
    assert ours.shape == (theirs.shape[0], 1, 96, 64) and ours.shape[0] == CASES[name]["examples"]
    if len(theirs):  # float32 storage of log-mel values of magnitude up to ~10
        assert np.abs(ours[:, 0].numpy() - theirs).max() <= 1e-5


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_embeddings_equal_the_reference_vgg_in_float64(ref, net64, name):
    with torch.no_grad():
        raw = net64(V.waveform_to_examples(_wave(ref, name), CASES[name]["sample_rate"])).numpy()
    assert _rel(raw, ref[f"raw/{name}"]) <= 1e-12  # FAD's features: the final ReLU dropped
    assert _rel(np.maximum(raw, 0), ref[f"relu/{name}"]) <= 1e-12  # torchvggish as shipped ends in a ReLU


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_float32_pipeline_equals_the_reference_fad_call(ref, name):
    """``VGGish.embed`` against ``torchvggish.VGGish(preprocess=True, postprocess=False)`` without its
    last ReLU, called as the FAD code calls it: ``model.forward(wave, sample_rate)``."""
    net = V.VGGish.from_file(WEIGHTS)
    wave = _wave(ref, name)
    [emb] = net.embed([(wave, CASES[name]["sample_rate"])])
    assert emb.dtype == torch.float64
    assert _rel(emb.numpy(), ref[f"pipeline/{name}"]) <= 1e-5


def test_a_clip_shorter_than_one_example_has_no_embedding(ref):
    net = V.VGGish.from_file(WEIGHTS)
    short, edge = net.embed([(_wave(ref, "short_0_5s"), 16000), (_wave(ref, "edge_0_975s"), 16000)])
    assert short.shape == (0, 128) and edge.shape == (1, 128)
    assert net.embed([]) == []
    # however short, at any rate: no example, no error (resampy itself refuses fewer than one output)
    assert [len(e) for e in net.embed([(np.zeros(1), 44100), (np.zeros(42000), 44100), (np.zeros(15599), 16000)])] == [0, 0, 0]
    with pytest.raises(ValueError, match="NaN or infinite"):
        V.waveform_to_examples(np.full(16000, np.nan), 16000)


def test_stereo_is_the_channel_mean(ref):
    stereo = _wave(ref, "stereo_2s")
    np.testing.assert_array_equal(V.waveform_to_examples(stereo, 16000), V.waveform_to_examples(stereo.mean(1), 16000))


# ---------------------------------------------------------------- the weights file
def test_pth_and_safetensors_load_the_same(tmp_path):
    from safetensors.torch import load_file

    pth = tmp_path / "vggish-10086976.pth"
    torch.save(load_file(str(WEIGHTS)), pth)
    a, b = V.VGGish.from_file(pth), V.VGGish.from_file(WEIGHTS)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.sizes == ((4, 8, 8, 8, 16, 16), 32, 128) and "reduced widths" in V.describe(a)
    # torchvggish's own VGGish module (with its PCA post-processor) saves pproc.* keys: dropped
    torch.save({**load_file(str(WEIGHTS)), "pproc.pca_means": torch.zeros(128, 1)}, pth)
    V.VGGish.from_file(pth)


class _Evil:
    def __reduce__(self):
        return (print, ("this ran code",))


def test_bad_weights_files_get_one_clear_error(tmp_path):
    from safetensors.torch import load_file

    good = load_file(str(WEIGHTS))
    path = tmp_path / "vggish.pth"
    with pytest.raises(ValueError, match=r"needs --vggish-weights FILE: torchvggish's VGGish weights vggish-10086976"):
        V.VGGish.from_file(None)
    with pytest.raises(FileNotFoundError, match="--vggish-weights .*no such file"):
        V.VGGish.from_file(path)
    torch.save({**good, "x": _Evil()}, path)
    with pytest.raises(ValueError, match="not a plain PyTorch state dict"):
        V.VGGish.from_file(path)
    path.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(ValueError, match="--vggish-weights"):
        V.VGGish.from_file(path)
    torch.save({"pca_eigen_vectors": torch.zeros(128, 128), "pca_means": torch.zeros(128)}, path)
    with pytest.raises(ValueError, match="PCA file"):
        V.VGGish.from_file(path)
    torch.save({k: v for k, v in good.items() if k != "embeddings.4.bias"}, path)
    with pytest.raises(ValueError, match="missing embeddings.4.bias"):
        V.VGGish.from_file(path)
    torch.save({**good, "features.3.weight": torch.zeros(8, 5, 3, 3)}, path)
    with pytest.raises(ValueError, match=r"features.3.weight has shape \(8, 5, 3, 3\), VGGish needs \(8, 4, 3, 3\)"):
        V.VGGish.from_file(path)
    (tmp_path / "w.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a plain PyTorch state dict or safetensors"):
        V.VGGish.from_file(tmp_path / "w.safetensors")
