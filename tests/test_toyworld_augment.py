"""The generator phases' off-world augmentation: captions leave out exactly the field played off the
world, and no held-out combination is ever drawn or played."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anymodal.toyworld import checkers, recipe as R, world
from anymodal.toyworld.audio_generator import augmented_audio_bank
from anymodal.toyworld.diffusion import caption_aux_loss, field_labels
from anymodal.toyworld.image_generator import AUX_FIELDS, augmented_image_bank


def test_audio_augmentation_names_only_what_it_plays():
    waves, captions, labels = augmented_audio_bank(24, seed=3)
    assert waves.shape == (24, world.CLIP_SAMPLES) and len(captions) == 24 and labels.shape == (24, 3)
    notes = np.array(list(world.NOTES.values()))
    for wave, caption, (note, waveform, duration) in zip(waves, captions, labels.tolist()):
        words = caption.lower().split()
        assert duration >= 0 and world.DURATION_PHRASES[tuple(world.DURATIONS)[duration]] in caption
        reading = checkers.read_audio(wave, world.SAMPLE_RATE)
        if note >= 0:  # a world note in another timbre: no waveform word
            assert waveform == -100 and not set(words) & set(world.WAVEFORMS)
            assert tuple(world.NOTES)[note].lower() in words
            assert reading.note == tuple(world.NOTES)[note]
        else:  # a world waveform off the note grid: no note name
            assert waveform >= 0 and world.WAVEFORMS[waveform] in words
            assert not {n.lower() for n in world.NOTES} & set(words)
            semitones = 12 * np.abs(np.log2(reading.f0 / notes))
            assert semitones.min() > 0.5  # never a world note, so never a held-out note x waveform pair
        assert world.parse_caption(caption) is None or not world.is_held_out(world.parse_caption(caption))


def test_image_augmentation_leaves_the_colour_unsaid_and_off_the_palette():
    pixels, captions, _ = augmented_image_bank(16, seed=5)
    assert pixels.shape == (16, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)
    images = ((pixels.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    for image, caption in zip(images, captions):
        words = caption.split()
        assert not set(words) & (set(world.COLOURS) - set(world.BACKGROUNDS)), caption
        shape = next(w for w in words if w in world.SHAPES)
        reading = checkers.read_image(image)
        assert reading.shape == shape, (caption, reading)
        # the fill is no palette colour: at least 50 in RGB from every one of them (60 when drawn)
        fg = np.asarray(reading.rgb, dtype=float)
        assert min(np.linalg.norm(fg - np.asarray(c)) for c in world.COLOURS.values()) > 50, (caption, fg)


def test_augmentation_fractions_are_checked():
    with pytest.raises(ValueError, match="augment_fraction must be in"):
        R.AudioGeneratorPhase(augment_fraction=3.0)
    with pytest.raises(ValueError, match="augment_fraction must be in"):
        R.ImageGeneratorPhase(augment_fraction=-0.1)
    assert R.AudioGeneratorPhase(augment_fraction=0.0).augment_fraction == 0.0


def test_aux_loss_ignores_unnamed_fields():
    specs = world.sample_specs("audio", 4, 0)
    fields_ = (("note", tuple(world.NOTES)), ("waveform", world.WAVEFORMS), ("duration", tuple(world.DURATIONS)))
    extra = torch.tensor([[-100, 1, 0], [2, -100, 1]])
    cfg = R.AudioGeneratorPhase()
    head, loss = caption_aux_loss(specs, fields_, 8, cfg, lambda tokens: tokens.float(), extra)
    tokens = torch.randn(2, 8)
    only_aug = loss(tokens, torch.tensor([4, 5]))  # the two augmented rows: every field named by one of them
    assert torch.isfinite(only_aug)
    no_note = loss(tokens[:1], torch.tensor([4]))  # a batch that never names the note adds no note term
    logits = torch.split(head(tokens[:1]), [len(v) for _, v in fields_], dim=-1)
    expected = cfg.text_aux_weight * (torch.nn.functional.cross_entropy(logits[1], torch.tensor([1]))
                                      + torch.nn.functional.cross_entropy(logits[2], torch.tensor([0])))
    assert torch.allclose(no_note, expected)


def test_image_aux_labels_are_what_the_caption_says():
    # the image phase's aux labels (text_aux_weight) for world captions and for the colourless augmented ones
    _, captions, specs = augmented_image_bank(12, seed=2)
    bank = world.make_bank("image", 12, "train", seed=4)
    rows = ([*zip(bank.captions, field_labels(bank.specs, AUX_FIELDS).tolist(), [True] * 12)]
            + [*zip(captions, field_labels(specs, AUX_FIELDS).tolist(), [False] * 12)])
    for caption, labels, colour_said in rows:
        said = world.parse_caption(caption).with_defaults()  # unsaid size / background read as the defaults
        for (name, values), label in zip(AUX_FIELDS, labels):
            if name != "colour" or colour_said:
                assert values[label] == getattr(said, name), (caption, name)


def test_image_aux_weight_is_checked():
    with pytest.raises(ValueError, match="image_generator.text_aux_weight must be >= 0"):
        R.ImageGeneratorPhase(text_aux_weight=-1.0)
    with pytest.raises(ValueError, match="audio_generator.text_aux_weight must be >= 0"):
        R.AudioGeneratorPhase(text_aux_weight=-1.0)
    assert R.ImageGeneratorPhase().text_aux_weight == 0.1  # the recipe trains with it (docs/toyworld.md)


def test_image_augmentation_never_draws_a_near_miss_of_a_held_out_pair():
    pixels, captions, _ = augmented_image_bank(64, seed=11)
    images = ((pixels.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
    for image, caption in zip(images, captions):
        reading = checkers.read_image(image)
        for colour, shape in world.HELD_OUT.image:
            if reading.shape == shape:
                assert np.linalg.norm(np.asarray(reading.rgb, float) - world.COLOURS[colour]) > 100, caption


def test_image_scores_break_shape_down_by_size():
    from anymodal.toyworld.image_generator import score_images

    specs = [world.ImageSpec("red", shape, size, "center", "black")
             for shape in ("circle", "square") for size in world.SIZES]
    images = [world.to_pil(world.render_image(s, rng=0)) for s in specs]
    perfect = score_images(images, specs)
    assert perfect["shape_ok"] == 1.0 and all(perfect[f"shape_ok_{z}"] == 1.0 for z in world.SIZES)
    # the small squares drawn as circles: only the small figure (and the overall one) falls
    wrong = [world.to_pil(world.render_image(world.ImageSpec("red", "circle", s.size, "center", "black"), rng=0))
             if s.size == "small" else img for s, img in zip(specs, images)]
    rates = score_images(wrong, specs)
    assert rates["shape_ok_small"] == 0.5 and rates["shape_ok_medium"] == rates["shape_ok_large"] == 1.0
    assert rates["shape_ok"] == round(5 / 6, 4)
