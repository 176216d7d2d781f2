"""anymodal's ImageBind preprocessing against the official pipeline, through stored fixtures.

The fixtures were made by ``tests/fixtures/make_reference_imagebind.py`` from the official code
(facebookresearch/ImageBind 53680b0, pytorchvideo 6cdc929; see ``imagebind_reference.json``)
on the synthetic inputs of ``tests/fixtures/imagebind_inputs.py``, which this test rebuilds.
Indices must match exactly, transformed values to 1e-4.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anymodal.encoders import ImageBindEncoder
from anymodal.encoders import preprocess as P
from anymodal.modality import Modality

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
import imagebind_inputs as inputs  # noqa: E402

torch.set_num_threads(1)
TOL = 1e-4


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "imagebind_reference.npz") as f:
        return {k: f[k] for k in f.files}


def _close(ours: torch.Tensor | np.ndarray, theirs: np.ndarray, what: str) -> None:
    ours = np.asarray(ours, dtype=np.float32)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} vs official {theirs.shape}"
    err = float(np.abs(ours - theirs).max())
    assert err <= TOL, f"{what}: max abs difference {err:.3g} from the official output (allowed {TOL})"


def test_fixture_records_the_reference_commits():
    meta = json.loads((FIXTURES / "imagebind_reference.json").read_text())
    assert meta["reference"]["imagebind"]["commit"].startswith("53680b0")
    assert meta["reference"]["pytorchvideo"]["commit"].startswith("6cdc929")


# ----------------------------------------------------------------------------- audio
def test_audio_clip_bounds_match_exactly(ref):
    lengths = inputs.bound_sweep_lengths()
    ours = np.asarray([P.clip_sample_bounds(int(n), inputs.BOUND_SWEEP_RATE, 2, 3) for n in lengths])
    bad = np.flatnonzero((ours != ref["audio_bounds"]).any(axis=(1, 2)))
    assert bad.size == 0, (f"{bad.size} of {len(lengths)} lengths differ, e.g. {int(lengths[bad[0]])} samples: "
                           f"ours {ours[bad[0]].tolist()} vs official {ref['audio_bounds'][bad[0]].tolist()}")


@pytest.mark.parametrize("name", list(inputs.AUDIO_CASES))
def test_audio_fbanks_match(ref, name):
    _, _, sr, mels = inputs.AUDIO_CASES[name]
    wave = inputs.audio_wave(name)
    ours = P.preprocess_audio([(wave, sr)], num_mel_bins=mels)[0]
    _close(ours, ref[f"audio/{name}"], f"audio {name}")
    np.testing.assert_array_equal(wave, inputs.audio_wave(name))  # the in-place mean stays on a private copy


def test_audio_options_that_deviate_do_deviate(ref):
    """The non-official choices are real alternatives: they change the overlapping, stereo case."""
    wave = inputs.audio_wave("stereo_4s")
    official = ref["audio/stereo_4s"]
    mixed = P.preprocess_audio([(wave, 16000)], channel="mean")[0].numpy()
    assert np.abs(mixed - official).max() > 0.1
    per_clip = P.preprocess_audio([(wave, 16000)], demean="per_clip")[0].numpy()
    assert np.abs(per_clip[0] - official[0]).max() <= TOL  # the first clip sees no earlier subtraction
    assert np.abs(per_clip[1:] - official[1:]).max() > 1e-3  # later clips straddle the shifted overlap


# ----------------------------------------------------------------------------- video
def test_video_frame_indices_match_exactly(ref):
    frames, rates = ref["video_sweep/frames"], ref["video_sweep/fps"]
    for k, (n, fps) in enumerate(zip(frames.tolist(), rates.tolist())):
        ours = P.clip_frame_indices(n, fps, clip_duration=2, num_clips=5, frames_per_clip=2)
        assert ours == ref["video_sweep/indices"][k].tolist(), f"{n} frames at {fps} fps"


@pytest.mark.parametrize("name", list(inputs.VIDEO_CASES))
def test_video_views_match(ref, name):
    n, fps, _, _ = inputs.VIDEO_CASES[name]
    assert P.clip_frame_indices(n, fps) == ref[f"video/{name}/indices"].tolist()
    ours = P.preprocess_videos([(inputs.video_frames(name), fps)])[0].numpy()  # official defaults: 224, 5 x 3
    assert ours.shape == (15, 3, 2, 224, 224)
    _close(ours[..., inputs.GRID[0], inputs.GRID[1]], ref[f"video/{name}/grid"], f"video {name} (grid)")
    _close(ours.mean(axis=(-2, -1)), ref[f"video/{name}/mean"], f"video {name} (view means)")


def test_issue_example_60s_at_30fps():
    assert P.clip_frame_indices(1800, 30.0)[0] == [0, 59]


def test_video_end_to_end_with_the_official_tiny_model(ref):
    """Our preprocessing + our encoder with the official model's (perturbed, tiny) weights = the official output."""
    opts = {"out_embed_dim": 8, "vision": {"embed_dim": 16, "depth": 1, "num_heads": 2}}
    enc = ImageBindEncoder.from_config(opts, [Modality.VIDEO], pretrained=FIXTURES / "imagebind_tiny_vision.safetensors")
    n, fps, _, _ = inputs.VIDEO_CASES["4s_24fps"]
    x = enc.preprocess(Modality.VIDEO, [(inputs.video_frames("4s_24fps"), fps)])
    with torch.no_grad():
        emb = enc(Modality.VIDEO, x)
    _close(emb[:, 0], ref["e2e/embedding"], "end-to-end video embedding")


# ----------------------------------------------------------------------------- image
@pytest.mark.parametrize("name", list(inputs.IMAGE_CASES))
def test_image_matches(ref, name):
    ours = P.preprocess_images([inputs.image(name)])[0].numpy()
    assert ours.shape == (3, 224, 224)
    _close(ours[..., inputs.IMAGE_GRID[0], inputs.IMAGE_GRID[1]], ref[f"image/{name}/grid"], f"image {name} (grid)")
    _close(ours.mean(axis=(-2, -1)), ref[f"image/{name}/mean"], f"image {name} (means)")


# ----------------------------------------------------------------------------- options and input forms
@pytest.mark.parametrize("field, value", [("video_crops", 2), ("video_sampling", "uniform"),
                                          ("audio_channel", "left"), ("audio_demean", "none"),
                                          ("video_assumed_fps", 0), ("video_clip_duration", float("nan"))])
def test_bad_preprocessing_options_name_the_field(field, value):
    from anymodal.encoders import ImageBindOptions

    with pytest.raises(ValueError, match=field):
        ImageBindOptions.from_dict({"preset": "tiny", field: value})


def test_video_rate_comes_from_the_input_or_the_assumed_fps(tmp_path):
    frames = inputs.video_frames("4s_24fps")[:40]
    small = dict(size=32, num_clips=2)
    bare = P.preprocess_videos([frames], **small)
    assert torch.equal(bare, P.preprocess_videos([(frames, 8.0)], **small))  # bare frames: 8 fps
    assert not torch.equal(bare, P.preprocess_videos([(frames, 24.0)], **small))
    assert torch.equal(P.preprocess_videos([(frames, 24.0)], **small),
                       P.preprocess_videos([frames], assumed_fps=24.0, **small))
    from anymodal.media import MediaError

    with pytest.raises(MediaError, match="frame rate must be a positive number"):
        P.preprocess_videos([(frames, -1.0)], **small)
    with pytest.raises(MediaError, match="carries its own frame rate"):
        P.preprocess_videos([(str(tmp_path / "x.mp4"), 24.0)], **small)


def test_video_file_frame_rates(tmp_path):
    import imageio.v3 as iio

    frames = [Image.fromarray(f) for f in inputs.video_frames("4s_24fps")[:6]]
    gif = tmp_path / "v.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=40, loop=0)
    assert P._file_fps(iio.immeta(gif)) == pytest.approx(25.0)
    pytest.importorskip("imageio_ffmpeg")
    mp4 = tmp_path / "v.mp4"
    iio.imwrite(mp4, np.stack(inputs.video_frames("4s_24fps")[:30]), extension=".mp4", fps=24, codec="libx264",
                macro_block_size=1)
    assert P._file_fps(iio.immeta(mp4)) == pytest.approx(24.0)


def test_segments_and_one_crop_reproduce_the_single_view_layout():
    """video_sampling="segments", video_crops=1: equal segments, centre crops; forward also takes the
    older (batch, 3, clips * frames, S, S) layout and gives the same embedding."""
    enc = ImageBindEncoder.from_config({"preset": "tiny", "video_sampling": "segments", "video_crops": 1},
                                       [Modality.VIDEO])
    frames = inputs.video_frames("4s_24fps")[:8]
    x = enc.preprocess(Modality.VIDEO, [frames])
    assert x.shape == (1, 2, 3, 2, 32, 32)
    ours = P.video_views([Image.fromarray(frames[i]) for i in (0, 4, 4, 7)], 2, size=32, crops=1)
    torch.testing.assert_close(x[0], ours, rtol=0, atol=0)
    flat = x[0].transpose(0, 1).reshape(1, 3, 4, 32, 32)  # (3, clips * frames, S, S)
    with torch.no_grad():
        torch.testing.assert_close(enc(Modality.VIDEO, flat), enc(Modality.VIDEO, x), rtol=0, atol=1e-6)


def test_three_crops_follow_the_longer_side():
    assert P._crop_offsets(224, 297, 224, 3) == [(0, 0), (0, 37), (0, 73)]  # centre rounded up: 36.5 -> 37
    assert P._crop_offsets(297, 224, 224, 3) == [(0, 0), (37, 0), (73, 0)]
    assert P._crop_offsets(224, 297, 224, 1) == [(0, 37)]
