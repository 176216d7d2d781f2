"""Encoders: tiny real ImageBind / CLIP / CLAP instances, media preprocessing, checkpoint compatibility."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from anymodal.encoders import ClapEncoder, ClipEncoder, ImageBindEncoder, ImageBindOptions
from anymodal.encoders import preprocess as P
from anymodal.media import Audio, MediaError
from anymodal.modality import Modality
from anymodal.registry import ENCODERS, list_encoders

torch.set_num_threads(1)  # 2 shared cores: more threads make tiny models slower, not faster

IMAGE, AUDIO, VIDEO, TEXT = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO, Modality.TEXT
MEDIA = [IMAGE, AUDIO, VIDEO]

TINY_CLIP = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 2,
             "image_size": 32, "patch_size": 8, "projection_dim": 16}
TINY_CLAP = {"spec_size": 64, "num_mel_bins": 16, "window_size": 4, "patch_size": 2, "patch_stride": 2,
             "depths": [2, 2], "num_attention_heads": [2, 2], "patch_embeds_hidden_size": 16, "hidden_size": 32,
             "projection_dim": 16}
TINY_CLAP_FE = {"feature_size": 16, "sampling_rate": 16000, "hop_length": 160, "max_length_s": 1,
                "fft_window_size": 400, "frequency_max": 8000}


# ----------------------------------------------------------------------------- helpers
def rgb(h: int = 40, w: int = 52, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def sine(sample_rate: int, seconds: float = 3.0, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def tiny_imagebind(modalities=(IMAGE, AUDIO, VIDEO), seed: int = 0, **overrides) -> ImageBindEncoder:
    torch.manual_seed(seed)
    return ImageBindEncoder.from_config({"preset": "tiny", **overrides}, list(modalities))


def sample_inputs(enc: ImageBindEncoder, m: Modality, batch: int = 2) -> torch.Tensor:
    if m is IMAGE:
        return enc.preprocess(m, [rgb(seed=i) for i in range(batch)])
    if m is AUDIO:
        return enc.preprocess(m, [(sine(16000, 2.5, 300.0 + 200 * i), 16000) for i in range(batch)])
    if m is VIDEO:
        return enc.preprocess(m, [[rgb(seed=10 * i + j) for j in range(6)] for i in range(batch)])
    return enc.preprocess(m, [[49406, 320 + i, 1125, 49407] for i in range(batch)])


@pytest.fixture(scope="module")
def enc() -> ImageBindEncoder:
    return tiny_imagebind()


@pytest.fixture(scope="module")
def inputs(enc: ImageBindEncoder) -> dict[Modality, torch.Tensor]:
    return {m: sample_inputs(enc, m) for m in MEDIA}


# ----------------------------------------------------------------------------- registry and options
def test_builtin_encoders_registered():
    assert {"imagebind", "clip", "clap"} <= set(list_encoders())
    assert ENCODERS.get("imagebind") is ImageBindEncoder


def test_options_presets_overrides_and_round_trip():
    tiny = ImageBindOptions.from_dict({"preset": "tiny"})
    assert (tiny.vision.embed_dim, tiny.image_size, tiny.patch_size) == (32, 32, 8)
    huge = ImageBindOptions.from_dict({"preset": "huge"})
    assert huge == ImageBindOptions.from_dict({}) == ImageBindOptions()
    assert (huge.vision.embed_dim, huge.vision.depth, huge.vision.num_heads) == (1280, 32, 16)
    assert (huge.audio.embed_dim, huge.audio.depth, huge.audio.num_heads, huge.audio.drop_path) == (768, 12, 12, 0.1)
    assert (huge.text.embed_dim, huge.text.depth, huge.text.num_heads, huge.out_embed_dim) == (1024, 24, 16, 1024)
    assert (huge.vision_tokens, huge.audio_tokens) == (257, 229)
    # trunk overrides merge into the preset's trunk
    o = ImageBindOptions.from_dict({"preset": "huge", "audio": {"drop_path": 0.0}, "output": "tokens"})
    assert (o.audio.embed_dim, o.audio.drop_path, o.output) == (768, 0.0, "tokens")
    assert ImageBindOptions.from_dict(json.loads(json.dumps(o.to_dict()))) == o


@pytest.mark.parametrize("options, field", [
    ({"preset": "large"}, "preset"),
    ({"preset": "tiny", "vison": {}}, "vison"),
    ({"preset": "tiny", "vision": {"embed_dim": 31}}, "vision.embed_dim"),
    ({"preset": "tiny", "audio": {"drop_path": 1.5}}, "audio.drop_path"),
    ({"preset": "tiny", "text": {"heads": 2}}, "heads"),
    ({"preset": "tiny", "output": "pooled"}, "output"),
    ({"preset": "tiny", "image_size": 30}, "image_size"),
    ({"preset": "tiny", "video_clips": 0}, "video_clips"),
    ({"preset": "tiny", "audio_clip_duration": -1}, "audio_clip_duration"),
])
def test_options_errors_name_the_field(options, field):
    with pytest.raises(ValueError, match=field):
        ImageBindOptions.from_dict(options)


# ----------------------------------------------------------------------------- tiny ImageBind
@pytest.mark.parametrize("m", MEDIA)
def test_embedding_shapes_and_normalisation(enc, inputs, m):
    with torch.no_grad():
        out = enc(m, inputs[m])
    assert out.shape == (2, *enc.feature_shape(m)) == (2, 1, 32)
    # Official postprocessors: vision L2-normalised; audio also scaled by a fixed logit scale of 20.
    # Audio and video average the per-clip embeddings, so their norm is at most the scale.
    norms = out.norm(dim=-1)
    if m is IMAGE:
        torch.testing.assert_close(norms, torch.ones_like(norms))
    else:
        assert bool((norms <= (20.0 if m is AUDIO else 1.0) + 1e-4).all())


def test_preprocessed_shapes(enc, inputs):
    assert inputs[IMAGE].shape == (2, 3, 32, 32)
    assert inputs[VIDEO].shape == (2, 6, 3, 2, 32, 32)  # video_clips (2) x video_crops (3) views of video_frames (2)
    assert inputs[AUDIO].shape == (2, 2, 1, 128, 204)  # audio_clips (2) x official fbank


def test_token_output_shapes():
    enc = tiny_imagebind((IMAGE, AUDIO, VIDEO, TEXT), output="tokens")
    expected = {IMAGE: (17, 32), VIDEO: (2 * 3 * 17, 32), AUDIO: (2 * 229, 32), TEXT: (77, 32)}
    with torch.no_grad():
        for m, shape in expected.items():
            assert enc.feature_shape(m) == shape
            assert enc(m, sample_inputs(enc, m)).shape == (2, *shape)


def test_text_branch_from_token_ids():
    enc = tiny_imagebind((TEXT,))
    ids = enc.preprocess(TEXT, [[49406, 320, 49407], [49406, 1, 2, 3, 49407]])
    assert ids.shape == (2, 77) and int(ids[0, 3]) == 0
    with torch.no_grad():
        out = enc(TEXT, ids)
    assert out.shape == (2, 1, 32)
    torch.testing.assert_close(out.norm(dim=-1), torch.full((2, 1), 1 / 0.07))  # learnable logit scale at init
    with pytest.raises(ValueError, match="token ids"):
        enc.preprocess(TEXT, ["a dog"])


def test_deterministic_and_seeded(enc, inputs):
    other = tiny_imagebind()  # same seed, same weights
    with torch.no_grad():
        for m in MEDIA:
            a, b = enc(m, inputs[m]), enc(m, inputs[m])
            assert torch.equal(a, b)
            assert torch.equal(a, other(m, inputs[m]))
    assert not enc.training  # from_config returns eval mode: no audio drop-path at inference


@pytest.mark.parametrize("m", MEDIA)
def test_batch_matches_single_items(enc, inputs, m):
    with torch.no_grad():
        both = enc(m, inputs[m])
        singles = torch.cat([enc(m, inputs[m][i:i + 1]) for i in range(2)])
    torch.testing.assert_close(both, singles, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both[0], both[1])


def test_only_requested_branches_are_built():
    image_only = tiny_imagebind((IMAGE,))
    assert list(image_only.modality_trunks) == ["vision"]
    assert not any(".audio." in k or ".text." in k for k in image_only.state_dict())
    video_audio = tiny_imagebind((VIDEO, AUDIO))
    assert list(video_audio.modality_trunks) == ["vision", "audio"]
    with pytest.raises(ValueError, match="not 'audio'"):
        image_only(AUDIO, torch.zeros(1, 2, 1, 128, 204))


def test_wrong_input_shapes_raise(enc):
    with pytest.raises(ValueError, match=r"\(batch, 3, 32, 32\)"):
        enc(IMAGE, torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="multiple of video_frames=2"):
        enc(VIDEO, torch.zeros(1, 3, 3, 32, 32))
    with pytest.raises(ValueError, match="128, 204"):
        enc(AUDIO, torch.zeros(1, 2, 1, 64, 204))


# ----------------------------------------------------------------------------- preprocessing
def test_image_from_path_pil_and_array_agree(tmp_path, enc):
    arr = rgb()
    path = tmp_path / "img.png"
    Image.fromarray(arr).save(path)
    from_path, from_str, from_pil, from_array = (enc.preprocess(IMAGE, [x])
                                                 for x in (path, str(path), Image.fromarray(arr), arr))
    assert torch.equal(from_path, from_pil) and torch.equal(from_str, from_pil) and torch.equal(from_array, from_pil)
    from_float = enc.preprocess(IMAGE, [arr.astype(np.float32) / 255.0])
    torch.testing.assert_close(from_float, from_pil)
    gray = enc.preprocess(IMAGE, [arr[..., 0]])
    assert gray.shape == (1, 3, 32, 32)
    # CLIP normalisation: a mid-grey image maps near (0.5 - mean) / std
    grey = enc.preprocess(IMAGE, [np.full((40, 40, 3), 128, np.uint8)])
    expected = (128 / 255 - torch.tensor(P.CLIP_MEAN)) / torch.tensor(P.CLIP_STD)
    torch.testing.assert_close(grey[0, :, 5, 5], expected, atol=1e-4, rtol=0)


def test_audio_from_wav_44k_matches_16k_array(tmp_path, enc):
    path = tmp_path / "tone.wav"
    sf.write(path, sine(44100), 44100)  # resampled to 16 kHz on load
    from_wav = enc.preprocess(AUDIO, [path])
    from_array = enc.preprocess(AUDIO, [(sine(16000), 16000)])
    assert from_wav.shape == from_array.shape == (1, 2, 1, 128, 204)
    torch.testing.assert_close(from_wav, from_array, atol=0.1, rtol=0)
    assert torch.equal(enc.preprocess(AUDIO, [Audio(sine(16000), 16000)]), from_array)
    stereo = np.stack([sine(16000), sine(16000)], axis=1)  # (samples, channels), as soundfile returns it
    torch.testing.assert_close(enc.preprocess(AUDIO, [(stereo, 16000)]), from_array)
    pcm16 = (sine(16000) * 32767).astype(np.int16)
    as_float = (pcm16.astype(np.float32) / 32768.0, 16000)  # PCM integers are scaled to [-1, 1)
    torch.testing.assert_close(enc.preprocess(AUDIO, [(pcm16, 16000)]), enc.preprocess(AUDIO, [as_float]))
    short = enc.preprocess(AUDIO, [(sine(16000, 0.01), 16000)])  # shorter than one fbank window: padded
    assert short.shape == (1, 2, 1, 128, 204)


def test_fbank_matches_imagebind_recipe():
    wave = torch.from_numpy(sine(16000, 2.0))
    fb = P.waveform_to_fbank(wave, 16000)
    assert fb.shape == (1, 128, 204)
    assert torch.equal(fb[0, :, 198:], torch.zeros(128, 6))  # 2 s give 198 frames; the rest is zero padding
    assert P.clip_spans(10.0, 2.0, 3) == [(0.0, 2.0), (4.0, 6.0), (8.0, 10.0)]
    assert P.clip_spans(1.0, 2.0, 3) == [(0.0, 2.0)] * 3


def test_video_from_frames_array_and_file(tmp_path, enc):
    frames = [rgb(seed=i) for i in range(8)]
    from_list = enc.preprocess(VIDEO, [frames])
    from_pil = enc.preprocess(VIDEO, [[Image.fromarray(f) for f in frames]])
    from_array = enc.preprocess(VIDEO, [np.stack(frames)])
    assert from_list.shape == (1, 6, 3, 2, 32, 32)
    assert torch.equal(from_list, from_pil) and torch.equal(from_list, from_array)
    assert P.sample_frame_indices(8, 4, num_clips=2) == [0, 4, 4, 7]
    assert P.sample_frame_indices(1, 4, num_clips=2) == [0, 0, 0, 0]
    path = tmp_path / "clip.gif"
    Image.fromarray(frames[0]).save(path, save_all=True, append_images=[Image.fromarray(f) for f in frames[1:]])
    from_file = enc.preprocess(VIDEO, [path])
    assert from_file.shape == (1, 6, 3, 2, 32, 32)
    with torch.no_grad():
        assert enc(VIDEO, torch.cat([from_list, from_file])).shape == (2, 1, 32)


def test_video_from_mp4(tmp_path, enc):
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v3 as iio

    # Smooth frames (a moving gradient) so lossy H.264 keeps them close to the originals.
    ramp = np.linspace(0, 200, 48, dtype=np.float32)
    frames = np.stack([np.broadcast_to((ramp[None, :, None] + 5 * t), (40, 48, 3)) for t in range(9)]).astype(np.uint8)
    path = tmp_path / "clip.mp4"
    iio.imwrite(path, frames, extension=".mp4", fps=8, codec="libx264", macro_block_size=1)
    from_file = enc.preprocess(VIDEO, [path])  # mp4 does not report its frame count: counted in a first pass
    assert from_file.shape == (1, 6, 3, 2, 32, 32)
    torch.testing.assert_close(from_file, enc.preprocess(VIDEO, [frames]), atol=0.15, rtol=0)


def test_unreadable_image_file_names_the_file(tmp_path, enc):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x00garbage, not a png\xff" * 10)
    with pytest.raises(MediaError, match=r"cannot read image '.*x\.png': not an image file"):
        enc.preprocess(IMAGE, [bad])
    with pytest.raises(MediaError, match="file not found"):
        enc.preprocess(IMAGE, [tmp_path / "missing.png"])


def test_text_file_as_audio_names_the_file(tmp_path, enc):
    notes = tmp_path / "notes.wav"
    notes.write_text("this is not audio\n" * 20)
    with pytest.raises(MediaError, match=r"audio file '.*notes\.wav' is not audio"):
        enc.preprocess(AUDIO, [notes])


@pytest.mark.parametrize("m, item, message", [
    (IMAGE, np.zeros((0, 4, 3), np.uint8), "empty"),
    (IMAGE, np.zeros((4, 4, 4, 3), np.uint8), "got shape"),
    (IMAGE, np.zeros((3, 8, 8), np.uint8), "channels-first"),
    (IMAGE, np.full((4, 4, 3), 255.0, np.float32), r"\[0, 1\]"),
    (IMAGE, 42, "unsupported input type"),
    (AUDIO, (np.zeros(0, np.float32), 16000), "empty"),
    (AUDIO, (np.zeros((2, 3, 4), np.float32), 16000), "got shape"),
    (AUDIO, (np.zeros(100, np.float32), 0), "sample rate"),
    (AUDIO, (np.full(100, np.nan, np.float32), 16000), "NaN"),
    (VIDEO, [], "empty"),
    (VIDEO, [np.zeros((8, 8, 3), np.uint8), "nope.png"], "frame 1"),
])
def test_bad_inputs_raise_media_error(enc, m, item, message):
    with pytest.raises(MediaError, match=message):
        enc.preprocess(m, [item])


def test_unreadable_video_file_raises_media_error(tmp_path, enc):
    bad = tmp_path / "movie.mp4"
    bad.write_bytes(b"definitely not a video" * 50)
    with pytest.raises(MediaError, match=r"cannot read video '.*movie\.mp4'"):
        enc.preprocess(VIDEO, [bad])
    with pytest.raises(MediaError) as e:
        enc.preprocess(VIDEO, [bad])
    assert "\n" not in str(e.value) and "ffmpeg version" not in str(e.value) and len(str(e.value)) < 400


def test_a_video_file_without_a_video_stream_is_one_line(tmp_path, enc):
    """An audio-only MP4 once gave 3,119 characters of ffmpeg banner."""
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    import subprocess

    path = tmp_path / "sound.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    "sine=frequency=440:duration=0.2", "-c:a", "aac", str(path)], check=True, timeout=60)
    with pytest.raises(MediaError) as e:
        enc.preprocess(VIDEO, [path])
    assert str(e.value) == (f"cannot read video '{path}': it has no video stream (its streams: audio); "
                            "send a file with moving pictures")


# ----------------------------------------------------------------------------- checkpoint compatibility
# Names and shapes of parameters in the official imagebind_huge.pth, derived from the reference
# implementation (facebookresearch/ImageBind, imagebind/models/*.py) for imagebind_huge().
OFFICIAL_HUGE_KEYS = {
    "modality_preprocessors.vision.cls_token": (1, 1, 1280),
    "modality_preprocessors.vision.rgbt_stem.proj.1.weight": (1280, 3, 2, 14, 14),
    "modality_preprocessors.vision.pos_embedding_helper.pos_embed": (1, 257, 1280),
    "modality_trunks.vision.pre_transformer_layer.0.weight": (1280,),
    "modality_trunks.vision.pre_transformer_layer.0.bias": (1280,),
    "modality_trunks.vision.blocks.0.attn.in_proj_weight": (3840, 1280),
    "modality_trunks.vision.blocks.0.attn.in_proj_bias": (3840,),
    "modality_trunks.vision.blocks.0.attn.out_proj.weight": (1280, 1280),
    "modality_trunks.vision.blocks.0.attn.out_proj.bias": (1280,),
    "modality_trunks.vision.blocks.0.norm_1.weight": (1280,),
    "modality_trunks.vision.blocks.0.mlp.fc1.weight": (5120, 1280),
    "modality_trunks.vision.blocks.0.mlp.fc2.weight": (1280, 5120),
    "modality_trunks.vision.blocks.31.norm_2.bias": (1280,),
    "modality_trunks.vision.blocks.31.mlp.fc2.bias": (1280,),
    "modality_heads.vision.0.weight": (1280,),
    "modality_heads.vision.0.bias": (1280,),
    "modality_heads.vision.2.weight": (1024, 1280),
    "modality_preprocessors.audio.cls_token": (1, 1, 768),
    "modality_preprocessors.audio.rgbt_stem.proj.weight": (768, 1, 16, 16),
    "modality_preprocessors.audio.rgbt_stem.norm_layer.weight": (768,),
    "modality_preprocessors.audio.rgbt_stem.norm_layer.bias": (768,),
    "modality_preprocessors.audio.pos_embedding_helper.pos_embed": (1, 229, 768),
    "modality_trunks.audio.blocks.0.attn.in_proj_weight": (2304, 768),
    "modality_trunks.audio.blocks.0.attn.bias_k": (1, 1, 768),
    "modality_trunks.audio.blocks.0.attn.bias_v": (1, 1, 768),
    "modality_trunks.audio.blocks.11.mlp.fc1.bias": (3072,),
    "modality_trunks.audio.blocks.11.attn.bias_v": (1, 1, 768),
    "modality_heads.audio.0.weight": (768,),
    "modality_heads.audio.2.weight": (1024, 768),
    "modality_postprocessors.audio.1.log_logit_scale": (),
    "modality_preprocessors.text.token_embedding.weight": (49408, 1024),
    "modality_preprocessors.text.pos_embed": (1, 77, 1024),
    "modality_preprocessors.text.mask": (77, 77),
    "modality_trunks.text.blocks.0.attn.in_proj_weight": (3072, 1024),
    "modality_trunks.text.blocks.23.norm_2.weight": (1024,),
    "modality_heads.text.proj.0.weight": (1024,),
    "modality_heads.text.proj.1.weight": (1024, 1024),
    "modality_postprocessors.text.1.log_logit_scale": (),
}


def test_huge_preset_matches_official_checkpoint_layout():
    with torch.device("meta"):  # 1.07 B parameters, no memory
        huge = ImageBindEncoder.from_config({"preset": "huge"}, [IMAGE, VIDEO, AUDIO, TEXT])
    shapes = {k: tuple(v.shape) for k, v in huge.state_dict().items()}
    for key, shape in OFFICIAL_HUGE_KEYS.items():
        assert key in shapes, f"missing official key {key}"
        assert shapes[key] == shape, f"{key}: {shapes[key]} != official {shape}"
    # Per branch: 12 tensors per block (+ bias_k/bias_v for audio), exact depth, nothing the official model lacks.
    per_block = {"vision": 12, "audio": 14, "text": 12}
    for branch, depth in {"vision": 32, "audio": 12, "text": 24}.items():
        block_keys = [k for k in shapes if k.startswith(f"modality_trunks.{branch}.blocks.")]
        assert len(block_keys) == depth * per_block[branch]
        assert f"modality_trunks.{branch}.blocks.{depth}.norm_1.weight" not in shapes
    assert len(shapes) == 864
    assert not any("bias_k" in k for k in shapes if ".vision." in k or ".text." in k)
    assert sum(v.numel() for v in huge.parameters()) == pytest.approx(1.073e9, rel=1e-3)
    assert huge.feature_shape(IMAGE) == (1, 1024)


def test_pth_checkpoint_round_trip(tmp_path, enc, inputs):
    full = tiny_imagebind((IMAGE, AUDIO, TEXT), seed=3)
    state = dict(full.state_dict())
    # The official file also holds branches we do not build; they are skipped, not errors.
    state["modality_trunks.depth.blocks.0.norm_1.weight"] = torch.ones(384)
    path = tmp_path / "imagebind_tiny.pth"
    torch.save(state, path)
    loaded = ImageBindEncoder.from_config({"preset": "tiny"}, [IMAGE, AUDIO, VIDEO], pretrained=str(path))
    assert not loaded.training and loaded.modality_trunks.vision.blocks[0].norm_1.weight.device.type == "cpu"
    with torch.no_grad():
        for m in (IMAGE, AUDIO):
            assert torch.equal(loaded(m, inputs[m]), full(m, inputs[m]))
    image_only = ImageBindEncoder.from_config({"preset": "tiny"}, [IMAGE], pretrained=path)
    with torch.no_grad():
        assert torch.equal(image_only(IMAGE, inputs[IMAGE]), full(IMAGE, inputs[IMAGE]))


def test_safetensors_checkpoint_and_key_errors(tmp_path, inputs):
    from safetensors.torch import save_file

    src = tiny_imagebind((IMAGE,), seed=4)
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(state, tmp_path / "ib.safetensors")
    loaded = ImageBindEncoder.from_config({"preset": "tiny"}, [IMAGE], pretrained=tmp_path / "ib.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(IMAGE, inputs[IMAGE]), src(IMAGE, inputs[IMAGE]))

    broken = dict(state)
    del broken["modality_heads.vision.2.weight"]
    broken["modality_trunks.vision.blocks.0.attn.bias_k"] = torch.zeros(1, 1, 32)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"1 missing keys: modality_heads\.vision\.2\.weight.*"
                                         r"1 unexpected keys: modality_trunks\.vision\.blocks\.0\.attn\.bias_k"):
        ImageBindEncoder.from_config({"preset": "tiny"}, [IMAGE], pretrained=tmp_path / "broken.pth")
    with pytest.raises(ValueError, match="shape mismatches"):  # the huge file into the tiny architecture
        ImageBindEncoder.from_config({"preset": "tiny", "out_embed_dim": 64}, [IMAGE], pretrained=tmp_path / "ib.safetensors")
    with pytest.raises(FileNotFoundError, match="from_pretrained"):
        ImageBindEncoder.from_config({"preset": "tiny"}, [IMAGE], pretrained=tmp_path)


def test_save_pretrained_round_trip(tmp_path, enc, inputs):
    enc.save_pretrained(tmp_path / "ib")
    meta = json.loads((tmp_path / "ib" / "config.json").read_text())
    assert meta["type"] == "imagebind" and meta["modalities"] == ["image", "audio", "video"]
    again = ImageBindEncoder.from_pretrained(tmp_path / "ib")
    assert again.options() == enc.options()
    with torch.no_grad():
        for m in MEDIA:
            assert torch.equal(again(m, inputs[m]), enc(m, inputs[m]))


# ----------------------------------------------------------------------------- HF encoders
@pytest.mark.parametrize("output, shape", [("embedding", (1, 16)), ("tokens", (17, 32))])
def test_clip_tiny(tmp_path, output, shape):
    torch.manual_seed(0)
    clip = ClipEncoder.from_config({"config": TINY_CLIP, "output": output}, [IMAGE])
    x = clip.preprocess(IMAGE, [rgb(seed=1), Image.fromarray(rgb(seed=2))])
    assert x.shape == (2, 3, 32, 32)
    with torch.no_grad():
        out = clip(IMAGE, x)
    assert clip.feature_shape(IMAGE) == shape and out.shape == (2, *shape)
    clip.save_pretrained(tmp_path / "clip")
    with torch.no_grad():
        assert torch.equal(ClipEncoder.from_pretrained(tmp_path / "clip")(IMAGE, x), out)


@pytest.mark.parametrize("output, shape", [("embedding", (1, 16)), ("tokens", (256, 32))])
def test_clap_tiny(tmp_path, output, shape):
    torch.manual_seed(0)
    clap = ClapEncoder.from_config({"config": TINY_CLAP, "feature_extractor": TINY_CLAP_FE, "output": output}, [AUDIO])
    path = tmp_path / "tone.wav"
    sf.write(path, sine(44100, 0.5), 44100)
    x = clap.preprocess(AUDIO, [path, (sine(16000, 2.0, 880.0), 16000)])
    assert x.shape == (2, 1, 101, 16)
    with torch.no_grad():
        out = clap(AUDIO, x)
    assert clap.feature_shape(AUDIO) == shape and out.shape == (2, *shape)
    clap.save_pretrained(tmp_path / "clap")
    with torch.no_grad():
        assert torch.equal(ClapEncoder.from_pretrained(tmp_path / "clap")(AUDIO, x), out)


def test_hf_encoder_config_errors():
    with pytest.raises(ValueError, match="serves only 'image'"):
        ClipEncoder.from_config({"config": TINY_CLIP}, [AUDIO])
    with pytest.raises(ValueError, match="exactly one of pretrained"):
        ClipEncoder.from_config({}, [IMAGE])
    with pytest.raises(ValueError, match="unknown field 'hidden'"):
        ClipEncoder.from_config({"hidden": 3}, [IMAGE])
    with pytest.raises(ValueError, match="feature_size"):
        ClapEncoder.from_config({"config": TINY_CLAP}, [AUDIO])  # default extractor: 64 mels, model: 16
