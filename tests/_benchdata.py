"""Tiny fabricated benchmark folders in each benchmark's released file layout, and tiny random
feature networks of the real classes (CLIPModel, ClapModel), for the evaluation tests."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
IMAGE_CAPTIONS = ["a red circle", "a blue square", "a green triangle", "a yellow circle", "a red square"]
AUDIO_CAPTIONS = ["a low sine tone of C4", "a high sine tone of A5", "a low square tone of E4", "a high sine tone of C5"]
VIDEO_CAPTIONS = ["a blue square moving left", "a red circle moving right", "a green circle moving up"]


def shape_image(caption: str, size: int = 48, offset: int = 0) -> Image.Image:
    words = caption.split()
    colour, shape = COLOURS[words[1]], words[2]
    im = Image.new("RGB", (size, size), (245, 245, 245))
    d = ImageDraw.Draw(im)
    box = (10 + offset, 10, size - 10 + offset, size - 10)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=colour)
    return im


def make_coco(root: Path, captions=IMAGE_CAPTIONS) -> Path:
    """``annotations/captions_val2014.json`` and ``val2014/COCO_val2014_<id:012d>.jpg``."""
    (root / "annotations").mkdir(parents=True)
    (root / "val2014").mkdir()
    images, anns = [], []
    for i, cap in enumerate(captions):
        image_id = 100 + 7 * i
        name = f"COCO_val2014_{image_id:012d}.jpg"
        shape_image(cap).save(root / "val2014" / name, quality=95)
        images.append({"id": image_id, "file_name": name, "height": 48, "width": 48})
        for k, ref in enumerate([cap, cap.replace("a ", "one ", 1), f"{cap} on a white background"]):
            anns.append({"id": 1000 * i + k, "image_id": image_id, "caption": ref})
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(
        {"info": {}, "licenses": [], "images": images, "annotations": anns}))
    return root


def tone(freq: float, seconds: float = 1.0, rate: int = 16000, square: bool = False) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = np.sin(2 * np.pi * freq * t)
    return (0.3 * (np.sign(wave) if square else wave)).astype(np.float32)


def make_audiocaps(root: Path, captions=AUDIO_CAPTIONS) -> Path:
    """``test.csv`` (audiocap_id, youtube_id, start_time, caption; several rows per clip) and
    ``audios/<audiocap_id>.wav``, as NExT-GPT's data folder names them; one clip has no WAV
    (a YouTube video that is gone)."""
    (root / "audios").mkdir(parents=True)
    rows = []
    for i, cap in enumerate(captions + ["a dog barking"]):
        ids = [str(5000 + 10 * i + k) for k in range(2)]
        for k, aid in enumerate(ids):
            rows.append({"audiocap_id": aid, "youtube_id": f"yt{i:03d}", "start_time": "30",
                         "caption": cap if k == 0 else f"{cap} playing"})
        if i < len(captions):
            sf.write(root / "audios" / f"{ids[0]}.wav", tone(220 * (1 + i), square="square" in cap), 16000)
    with (root / "test.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["audiocap_id", "youtube_id", "start_time", "caption"])
        w.writeheader()
        w.writerows(rows)
    return root


def make_msrvtt(root: Path, captions=VIDEO_CAPTIONS) -> Path:
    """``test_videodatainfo.json`` (videos with split, sentences) and ``TestVideo/video<k>.mp4``."""
    import imageio.v3 as iio

    (root / "TestVideo").mkdir(parents=True)
    videos, sentences = [], []
    for i, cap in enumerate(captions):
        vid = f"video{7010 + i}"
        frames = np.stack([np.asarray(shape_image(cap, 48, offset=2 * t - 4)) for t in range(6)])
        iio.imwrite(root / "TestVideo" / f"{vid}.mp4", frames, fps=6, codec="libx264")
        videos.append({"video_id": vid, "split": "test", "category": 0, "url": "", "start time": 0, "end time": 1, "id": i})
        for k, ref in enumerate([cap, f"{cap} on white"]):
            sentences.append({"caption": ref, "video_id": vid, "sen_id": 100 * i + k})
    videos.append({"video_id": "video1", "split": "train", "category": 0, "url": "", "start time": 0, "end time": 1, "id": 99})
    (root / "test_videodatainfo.json").write_text(json.dumps({"info": {}, "videos": videos, "sentences": sentences}))
    return root


VQA_QUESTIONS = [  # (image caption, question, ten answers)
    ("a red circle", "What colour is the circle?", ["red"] * 8 + ["dark red", "orange"]),
    ("a blue square", "What shape is it?", ["square"] * 9 + ["a square"]),
    ("a green triangle", "How many triangles are there?", ["1"] * 6 + ["one"] * 4),
    ("a yellow circle", "Is it a circle?", ["yes"] * 10),
]


def make_vqav2(root: Path) -> Path:
    """``v2_OpenEnded_mscoco_val2014_questions.json``, ``v2_mscoco_val2014_annotations.json`` and
    ``val2014/COCO_val2014_<image_id:012d>.jpg``."""
    (root / "val2014").mkdir(parents=True)
    questions, annotations = [], []
    for i, (cap, q, answers) in enumerate(VQA_QUESTIONS):
        image_id = 42 + i
        shape_image(cap).save(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", quality=95)
        qid = image_id * 1000 + 1
        questions.append({"image_id": image_id, "question": q, "question_id": qid})
        annotations.append({"question_type": "what", "multiple_choice_answer": answers[0], "answer_type": "other",
                            "image_id": image_id, "question_id": qid,
                            "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                        for j, a in enumerate(answers)]})
    (root / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(
        {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "license": {},
         "questions": questions}))
    (root / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(
        {"info": {}, "data_type": "mscoco", "data_subtype": "val2014", "license": {}, "annotations": annotations}))
    return root


# ---------------------------------------------------------------- tiny feature networks
_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def make_clip_dir(path: Path) -> Path:
    """A tiny random CLIPModel with its CLIPProcessor, saved as a local folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab: dict[str, int] = {}
    for c in _CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=64,
                                      bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"]),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=32, patch_size=8), projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(path)
    return path


def make_clap_dir(path: Path) -> Path:
    """A tiny random ClapModel with its ClapProcessor (8 kHz, 1 s), saved as a local folder."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault("Ġ" + c, len(vocab))
    cfg = ClapConfig(text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=72, projection_dim=8),
                     audio_config=dict(spec_size=64, window_size=4, num_mel_bins=16, hidden_size=16,
                                       patch_embeds_hidden_size=8, depths=[1, 1], num_attention_heads=[2, 2],
                                       patch_size=4, patch_stride=(4, 4), projection_dim=8),
                     projection_dim=8)
    torch.manual_seed(0)
    ClapModel(cfg).save_pretrained(path)
    fe = ClapFeatureExtractor(feature_size=16, sampling_rate=8000, hop_length=160, max_length_s=1, fft_window_size=512,
                              truncation="rand_trunc", padding="repeatpad")
    ClapProcessor(feature_extractor=fe, tokenizer=RobertaTokenizer(vocab=vocab, merges=[])).save_pretrained(path)
    return path


class TinyImageFeatures(torch.nn.Module):
    """A tiny random feature network for FID: uint8 images in, 6 features out."""

    num_features = 6

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 5, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x.float() / 255)).mean(dim=(2, 3)) + 0.1 * torch.tanh(self.conv(x.float() / 255)).amax(dim=(2, 3))
