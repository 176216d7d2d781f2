"""The toy world and its checkers: determinism, held-out splits, the caption grammar, and that
the analytic checkers are right on clean and degraded renders and wrong on noise."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from anymodal.toyworld import checkers as C
from anymodal.toyworld import world as W


def _rate(results: list[dict[str, bool]]) -> dict[str, float]:
    keys = results[0].keys()
    return {k: float(np.mean([r[k] for r in results])) for k in keys}


# ----------------------------------------------------------------------------- vocabulary


def test_colours_are_far_apart_and_off_every_background():
    for a, b in itertools.combinations(W.COLOURS, 2):
        assert np.linalg.norm(np.subtract(W.COLOURS[a], W.COLOURS[b])) >= 90, (a, b)
    for c, rgb in W.COLOURS.items():
        for bg, ends in W.BACKGROUNDS.items():
            if bg != c:
                assert min(np.linalg.norm(np.subtract(rgb, e)) for e in ends) >= 120, (c, bg)


def test_vocabulary_sizes():
    assert len(W.NOTES) == 11 and list(W.NOTES.values()) == sorted(W.NOTES.values())
    assert W.NOTES["A4"] == pytest.approx(440.0)
    assert len(W.all_specs("image")) == 1920  # 7 colours x 4 shapes x 3 sizes x 5 positions x 5 bgs - same colour
    assert len(W.all_specs("audio")) == 66
    assert len(W.all_specs("video")) == 112


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("modality", ["image", "audio", "video"])
def test_banks_are_deterministic(modality):
    a = W.make_bank(modality, 12, "train", seed=7)
    b = W.make_bank(modality, 12, "train", seed=7)
    c = W.make_bank(modality, 12, "train", seed=8)
    assert np.array_equal(a.data, b.data) and a.captions == b.captions and a.specs == b.specs
    assert not np.array_equal(a.data, c.data)
    assert a.captions == [s.caption() for s in a.specs]


def test_samplers_accept_seed_or_generator_and_repeat():
    assert W.sample_specs("image", 50, 3) == W.sample_specs("image", 50, np.random.default_rng(3))
    s1, s2 = W.sample("audio", 5), W.sample("audio", 5)
    assert s1.spec == s2.spec and np.array_equal(s1.data, s2.data)
    d1 = W.sample_dialogue(11)
    d2 = W.sample_dialogue(11)
    assert d1.task == d2.task and d1.texts() == d2.texts() and d1.target == d2.target
    for t1, t2 in zip(d1.turns, d2.turns):
        for p1, p2 in zip(t1["content"], t2["content"]):
            if p1["type"] != "text":
                assert np.array_equal(p1[p1["type"]], p2[p2["type"]])


def test_render_without_rng_is_canonical():
    spec = W.ImageSpec("red", "circle", "medium", "center", "blue")
    assert np.array_equal(W.render_image(spec), W.render_image(spec))
    img = W.render_image(spec)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert tuple(img[32, 32]) == W.COLOURS["red"] and tuple(img[0, 0]) == W.COLOURS["blue"]
    wave = W.render_audio(W.AudioSpec("A4", "sine", "short"))
    assert wave.shape == (W.CLIP_SAMPLES,) and wave.dtype == np.float32
    assert np.abs(wave).max() == pytest.approx(0.5, abs=1e-3) and np.all(wave[9000:] == 0)
    video = W.render_video(W.VideoSpec("red", "square", "left"))
    assert video.shape == (W.VIDEO_FRAMES, W.VIDEO_SIZE, W.VIDEO_SIZE, 3) and video.dtype == np.uint8


# ----------------------------------------------------------------------------- held out


def test_train_never_holds_held_out_pairs():
    for m in ("image", "audio", "video"):
        train, held = W.all_specs(m, "train"), W.all_specs(m, "heldout")
        assert train and held and len(train) + len(held) == len(W.all_specs(m))
        assert not any(W.is_held_out(s) for s in train)
        assert all(W.is_held_out(s) for s in held)
        assert not any(W.is_held_out(s) for s in W.sample_specs(m, 2000, 0, "train"))
        assert all(W.is_held_out(s) for s in W.make_bank(m, 20, "heldout", seed=1).specs)
    train_images = W.all_specs("image", "train")
    for colour, shape in W.HELD_OUT.image:  # each part of a held-out pair is still seen in training
        assert any(s.colour == colour for s in train_images) and any(s.shape == shape for s in train_images)
    train_audio = W.all_specs("audio", "train")
    for note, wave in W.HELD_OUT.audio:
        assert any(s.note == note for s in train_audio) and any(s.waveform == wave for s in train_audio)
    train_video = W.all_specs("video", "train")
    for colour, direction in W.HELD_OUT.video:
        assert any(s.colour == colour for s in train_video) and any(s.direction == direction for s in train_video)
    # the demo prompt stays in training
    assert not W.is_held_out(W.parse_caption("a red circle on a blue background"))


def _media_specs(dialogue):
    return [p["spec"] for t in dialogue.turns for p in t["content"] if p["type"] != "text"]


def test_dialogues_respect_the_split():
    g = np.random.default_rng(0)
    for _ in range(300):
        d = W.sample_dialogue(g, "train", render_media=False)
        assert not W.is_held_out(d.target) and not any(W.is_held_out(s) for s in _media_specs(d))
        h = W.sample_dialogue(g, "heldout", render_media=False)
        assert W.is_held_out(h.target)


# ----------------------------------------------------------------------------- captions


def test_caption_round_trip_on_every_combination():
    for m in ("image", "audio", "video"):
        for spec in W.all_specs(m):
            parsed = W.parse_caption(spec.caption())
            assert parsed is not None, spec.caption()
            if isinstance(parsed, W.ImageSpec):
                parsed = parsed.with_defaults()
            assert parsed == spec, spec.caption()
            assert W.spec_from_dict(spec.to_dict()) == spec


def test_captions_read_as_designed():
    assert W.ImageSpec("red", "circle", "medium", "center", "blue").caption() == "a red circle on a blue background"
    assert W.ImageSpec("green", "triangle", "small", "left", "black").caption() == "a small green triangle on the left"
    assert W.ImageSpec("orange", "cross", "medium", "top", "black").caption() == "an orange cross at the top"
    assert W.AudioSpec("A5", "sine", "short").caption() == "a high sine tone of A5 lasting half a second"
    assert W.VideoSpec("red", "square", "left").caption() == "a red square moving left"


@pytest.mark.parametrize("text, expected", [
    ("draw a red circle on a blue background", W.ImageSpec("red", "circle", background="blue")),
    ("Show me a big red circle in the middle.", W.ImageSpec("red", "circle", "large", "center")),
    ("an orange cross at the top on a gradient background", W.ImageSpec("orange", "cross", position="top",
                                                                           background="gradient")),
    ("play a low square tone", W.AudioSpec(waveform="square", register="low")),
    ("play a sawtooth tone of C6 lasting one second", W.AudioSpec("C6", "sawtooth", "long")),
    ("a high sine tone of A5 lasting half a second", W.AudioSpec("A5", "sine", "short")),
    ("make a video of a red square moving left", W.VideoSpec("red", "square", "left")),
    ("a red circle with a hat", None),
    ("a purple elephant", None),
    ("a red circle on a red background", None),
    ("a sine tone of C#4", None),
    ("a low sine tone of A5", None),
    ("a red blue circle", None),
    ("what colour is this?", None),
    ("a red square moving left on a blue background", None),
    ("", None),
])
def test_parse_prompts_and_rejects(text, expected):
    assert W.parse_caption(text) == expected


def test_every_prompt_template_parses_to_its_spec():
    for m, templates in W._GENERATE_TEMPLATES.items():
        for spec in W.all_specs(m)[::7]:
            for t in templates:
                parsed = W.parse_caption(t.format(spec.caption()))
                assert parsed is not None
                assert (parsed.with_defaults() if isinstance(parsed, W.ImageSpec) else parsed) == spec


def test_complete_spec_fills_defaults_and_samples_the_rest():
    assert W.complete_spec(W.ImageSpec("red", "circle")) == W.ImageSpec("red", "circle", "medium", "center", "black")
    low = W.complete_spec(W.AudioSpec(waveform="square", register="low"), rng=0, split="train")
    assert low.is_complete and low.register == "low" and low.waveform == "square" and not W.is_held_out(low)


# ----------------------------------------------------------------------------- argument errors


@pytest.mark.parametrize("call, message", [
    (lambda: W.ImageSpec(colour="pink"), "expected one of: red, orange"),
    (lambda: W.ImageSpec(colour="blue", background="blue"), "cannot be drawn"),
    (lambda: W.AudioSpec(note="C#4"), "unknown note"),
    (lambda: W.AudioSpec("A5", register="low"), "high note"),
    (lambda: W.VideoSpec(direction="sideways"), "left, right, up, down"),
    (lambda: W.make_bank("smell", 3), "unknown modality"),
    (lambda: W.make_bank("text", 3), "no text media"),
    (lambda: W.sample("image", 0, split="test"), "train, heldout"),
    (lambda: W.sample_specs("image", 3, None), "int seed"),
    (lambda: W.all_specs("image", restrict={"hue": ["red"]}), "no field 'hue'"),
    (lambda: W.all_specs("image", restrict={"colour": "red"}), "list of values"),
    (lambda: W.render_image(W.ImageSpec("red", "circle")), "missing: size, position, background"),
    (lambda: W.sample_dialogue(0, tasks=["t2x"]), "unknown task"),
    (lambda: C.check_answer("note", "A5", W.ImageSpec("red", "circle", "medium", "center", "black")),
     "unknown question kind"),
    (lambda: C.read_image(np.zeros((64, 64))), "(H, W, 3)"),
    (lambda: C.read_audio(np.zeros((2, 16000))), "mono"),
])
def test_bad_arguments_raise_clear_value_errors(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


# ----------------------------------------------------------------------------- image checker


def test_image_checker_is_right_on_every_clean_render():
    g = np.random.default_rng(0)
    results = [C.score_image(W.render_image(s, g), s) for s in W.all_specs("image")]
    assert _rate(results)["ok"] == 1.0


def test_image_checker_survives_blur_and_noise():
    g = np.random.default_rng(1)
    specs = W.all_specs("image")[::3]  # 640 specs: every colour, shape, size, position, background
    per_value: dict[tuple[str, str], list[bool]] = {}
    results = []
    for s in specs:
        img = C.degrade_image(W.render_image(s, g), g, blur_sigma=g.uniform(1.0, 1.5), noise_std=15.0)
        r = C.score_image(img, s)
        results.append(r)
        for name in ("colour", "shape", "size", "position", "background"):
            per_value.setdefault((name, getattr(s, name)), []).append(r["ok"])
    rates = _rate(results)
    assert all(v >= 0.95 for v in rates.values()), rates
    assert all(np.mean(v) >= 0.9 for v in per_value.values())


def test_image_checker_takes_pil_and_float_images():
    spec = W.ImageSpec("purple", "cross", "large", "right", "white")
    img = W.render_image(spec)
    assert C.score_image(W.to_pil(img), spec)["ok"]
    assert C.score_image(img.astype(np.float32) / 255.0, spec)["ok"]
    reading = C.read_image(img)
    assert reading.rgb is not None and np.allclose(reading.rgb, W.COLOURS["purple"], atol=3)


def test_image_checker_rejects_noise_and_blanks():
    g = np.random.default_rng(2)
    specs = W.sample_specs("image", 150, g)
    images = ([g.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(50)]
              + [np.clip(g.normal(128, 60, (64, 64, 3)), 0, 255).astype(np.uint8) for _ in range(50)]
              + [np.full((64, 64, 3), g.integers(0, 256, 3), dtype=np.uint8) for _ in range(50)])
    rates = _rate([C.score_image(im, s) for im, s in zip(images, specs)])
    assert rates["ok"] <= 0.05 and rates["found"] <= 0.1, rates


# ----------------------------------------------------------------------------- audio checker


def test_audio_checker_is_right_on_every_clean_tone_and_at_20db_snr():
    g = np.random.default_rng(0)
    clean, noisy = [], []
    for s in W.all_specs("audio"):
        wave = W.render_audio(s, g)
        clean.append(C.score_audio(wave, W.SAMPLE_RATE, s))
        noisy.extend(C.score_audio(C.degrade_audio(wave, g, snr_db=20.0), W.SAMPLE_RATE, s) for _ in range(2))
    assert _rate(clean)["ok"] == 1.0
    rates = _rate(noisy)
    assert all(v >= 0.95 for v in rates.values()), rates


def test_audio_checker_survives_griffin_lim_phase_smear():
    g = np.random.default_rng(1)
    specs = W.all_specs("audio")[::3]  # 22 tones: every note and waveform
    results = [C.score_audio(C.degrade_audio(W.render_audio(s, g), g, 20.0, griffin_lim=True, n_mels=None),
                             W.SAMPLE_RATE, s) for s in specs]
    rates = _rate(results)
    assert all(v >= 0.95 for v in rates.values()), rates


@pytest.mark.slow
def test_audio_checker_survives_mel_griffin_lim():
    g = np.random.default_rng(2)
    specs = W.all_specs("audio")
    results = [C.score_audio(C.degrade_audio(W.render_audio(s, g), g, 20.0, griffin_lim=True, n_mels=64),
                             W.SAMPLE_RATE, s) for s in specs]
    assert _rate(results)["ok"] >= 0.95


def test_audio_pitch_is_not_fooled_by_harmonics():
    for note in ("C4", "A4", "C6"):
        for wave in ("square", "sawtooth"):
            r = C.read_audio(W.render_audio(W.AudioSpec(note, wave, "long")))
            assert r.note == note and abs(r.cents) < 10 and r.waveform == wave


def test_audio_checker_rejects_noise_and_silence():
    g = np.random.default_rng(3)
    specs = W.sample_specs("audio", 90, g)
    waves = ([g.normal(0, 0.2, W.CLIP_SAMPLES) for _ in range(30)]
             + [g.uniform(-0.5, 0.5, W.CLIP_SAMPLES) * np.linspace(1, 0, W.CLIP_SAMPLES) for _ in range(30)]
             + [np.zeros(W.CLIP_SAMPLES) for _ in range(30)])
    rates = _rate([C.score_audio(w, W.SAMPLE_RATE, s) for w, s in zip(waves, specs)])
    assert rates["ok"] <= 0.05 and rates["note_ok"] <= 0.1, rates


def test_audio_off_grid_pitch_reads_as_no_note():
    t = np.arange(W.CLIP_SAMPLES) / W.SAMPLE_RATE
    between = W.NOTES["E4"] * 2 ** (1.5 / 12)  # halfway between E4 and G4
    r = C.read_audio(0.5 * np.sin(2 * np.pi * between * t))
    assert r.found and r.note is None and r.waveform == "sine"


# ----------------------------------------------------------------------------- video checker


def test_video_checker_clean_and_degraded():
    g = np.random.default_rng(0)
    clean, degraded = [], []
    for s in W.all_specs("video"):
        video = W.render_video(s, g)
        clean.append(C.score_video(video, s))
        degraded.append(C.score_video(C.degrade_video(video, g, blur_sigma=g.uniform(1.0, 1.5)), s))
    assert _rate(clean)["ok"] == 1.0
    rates = _rate(degraded)
    assert all(v >= 0.95 for v in rates.values()), rates


def test_video_checker_rejects_noise_and_still_frames():
    g = np.random.default_rng(4)
    specs = W.sample_specs("video", 40, g)
    noise = [C.score_video(g.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), s) for s in specs[:20]]
    assert _rate(noise)["ok"] == 0.0
    for s in specs[20:]:
        still = np.repeat(W.render_image(W.ImageSpec(s.colour, s.shape, "large", "center", "black"),
                                         resolution=32)[None], 8, axis=0)
        r = C.score_video(still, s)
        assert r["colour_ok"] and not r["direction_ok"]


# ----------------------------------------------------------------------------- text answers


@pytest.mark.parametrize("kind, answer, ok", [
    ("colour", "red", True), ("colour", "It is red.", True), ("colour", "blue", False),
    ("colour", "red and green", False), ("colour", "a small red circle on the left on a blue background", True),
    ("shape", "a circle", True), ("shape", "square", False),
    ("position", "on the left", True), ("position", "in the center", False),
    ("size", "small", True), ("background", "a blue background", True), ("background", "red", False),
    ("caption", "a small red circle on the left on a blue background", True),
    ("caption", "a red circle", False),  # unsaid means medium, center, black
    ("caption", "nonsense", False),
])
def test_image_answers(kind, answer, ok):
    assert C.check_answer(kind, answer, W.ImageSpec("red", "circle", "small", "left", "blue")) is ok


@pytest.mark.parametrize("kind, answer, ok", [
    ("note", "A5", True), ("note", "a5", True), ("note", "A4", False), ("note", "A#5", False),
    ("waveform", "a sine wave", True), ("waveform", "square", False),
    ("duration", "half a second", True), ("duration", "one second", False),
    ("register", "high", True), ("register", "low", False),
    ("caption", "a high sine tone of A5 lasting half a second", True),
    ("caption", "a high sine tone of A5", False),
])
def test_audio_answers(kind, answer, ok):
    assert C.check_answer(kind, answer, W.AudioSpec("A5", "sine", "short")) is ok


def test_score_text_reports_fields():
    spec = W.VideoSpec("red", "square", "left")
    assert C.score_text("caption", "a red circle moving left", spec) == {
        "colour_ok": True, "shape_ok": False, "direction_ok": True, "ok": False}
    assert C.check_answer("direction", "it moves to the left", spec)


# ----------------------------------------------------------------------------- dialogues


def test_dialogues_are_well_formed_and_consistent():
    g = np.random.default_rng(5)
    tasks = Counter()
    for _ in range(200):
        d = W.sample_dialogue(g, render_media=False)
        tasks[d.task] += 1
        assert [t["role"] for t in d.turns] == ["user", "assistant"] * (len(d.turns) // 2)
        for turn in d.turns:
            for part in turn["content"]:
                assert part["type"] in ("text", "image", "audio", "video")
                assert ("text" in part) if part["type"] == "text" else ("spec" in part)
        last = d.turns[-1]["content"]
        if d.question is not None:  # *2t: the answer is right about the user's media
            assert C.check_answer(d.question, last[0]["text"], d.target)
            assert d.turns[0]["content"][0]["spec"] == d.target
        else:  # the last assistant turn says the caption and holds the target
            assert last[0]["text"] == d.target.caption() and last[1]["spec"] == d.target
        if d.task in ("i2i", "edit_image", "edit_audio", "edit_video"):
            start = d.turns[0]["content"][0]["spec"] if d.task == "i2i" else d.turns[1]["content"][1]["spec"]
            instruction = d.turns[-2]["content"][-1]["text"]
            assert W.apply_edit(start, instruction) == d.target, (start, instruction)
        else:
            if d.question is None:  # the prompt names the target (audio prompts may leave out note or length)
                asked = W.parse_caption(d.turns[0]["content"][-1]["text"])
                if isinstance(asked, W.ImageSpec):
                    asked = asked.with_defaults()
                assert asked.matches(d.target)
    assert set(tasks) == set(W.TASKS)


def test_rendered_dialogue_media_pass_the_checkers():
    g = np.random.default_rng(6)
    scorers = {"image": lambda p: C.score_image(p["image"], p["spec"]),
               "audio": lambda p: C.score_audio(p["audio"], p["sample_rate"], p["spec"]),
               "video": lambda p: C.score_video(p["video"], p["spec"])}
    for _ in range(40):
        d = W.sample_dialogue(g)
        for turn in d.turns:
            for part in turn["content"]:
                if part["type"] != "text":
                    assert scorers[part["type"]](part)["ok"]


def test_edits():
    img = W.ImageSpec("red", "circle", "medium", "center", "blue")
    assert W.apply_edit(img, "make it green") == W.ImageSpec("green", "circle", "medium", "center", "blue")
    assert W.apply_edit(img, "make it bigger").size == "large"
    assert W.apply_edit(img, "move it to the left").position == "left"
    assert W.apply_edit(img, "put it on a white background").background == "white"
    assert W.apply_edit(img, "make it blue") is None  # would vanish into the background
    assert W.apply_edit(img, "make it higher") is None
    tone = W.AudioSpec("A4", "sine", "short")
    assert W.apply_edit(tone, "now make it sound higher") == W.AudioSpec("C5", "sine", "short")
    assert W.apply_edit(tone, "make it lower").note == "G4"
    assert W.apply_edit(tone, "make it a square wave").waveform == "square"
    assert W.apply_edit(tone, "make it shorter") is None
    assert W.apply_edit(W.AudioSpec("C6", "sine", "long"), "make it higher") is None
    assert W.apply_edit(W.VideoSpec("red", "square", "left"), "make it move up").direction == "up"


# ----------------------------------------------------------------------------- banks


def test_bank_save_load_round_trip(tmp_path):
    bank = W.make_bank("audio", 6, "heldout", seed=2)
    path = bank.save(tmp_path / "bank.npz")
    back = W.Bank.load(path)
    assert back.modality is bank.modality and back.split == "heldout" and back.seed == 2
    assert np.array_equal(back.data, bank.data) and back.captions == bank.captions and back.specs == bank.specs
    assert back[3].caption == bank.captions[3]


def test_bank_restrict():
    bank = W.make_bank("image", 30, seed=0, restrict={"background": ["black"], "position": ["center"]})
    assert {s.background for s in bank.specs} == {"black"} and {s.position for s in bank.specs} == {"center"}
    assert all(W.parse_caption(c).with_defaults() == s for c, s in zip(bank.captions, bank.specs))


def test_audio_checker_fails_clipped_and_distorted_tones():
    """A checker that reads only the pitch passes a clipped file: a hard-clipped sine (what every saved
    WAV was) must fail, on its flat tops and on a sine's crest factor."""
    g = np.random.default_rng(3)
    for s in W.all_specs("audio")[::5]:
        wave = W.render_audio(s, g)
        assert C.score_audio(wave, W.SAMPLE_RATE, s)["clean_ok"], s
        clipped = np.clip(wave * 8, -1, 1)
        r = C.read_audio(clipped)
        assert r.clipped > 0.3 and not C.score_audio(clipped, W.SAMPLE_RATE, s)["ok"], (s, r.clipped)
    sine = W.AudioSpec(note="A4", waveform="sine", duration="long")
    wave = W.render_audio(sine, g)
    assert 1.3 < C.read_audio(wave).crest < 1.6
    # soft saturation (tanh): no flat tops, but the crest and harmonics of a square, not a sine
    assert not C.score_audio(np.tanh(wave * 20), W.SAMPLE_RATE, sine)["ok"]


def test_rephrasings_keep_the_request_and_the_held_out_forms_are_never_trained_on():
    g = np.random.default_rng(5)
    train = {t for forms in W._ASK_GENERATE["train"].values() for t in forms}
    held = {t for forms in W._ASK_GENERATE["heldout"].values() for t in forms}
    assert not train & held
    qs_train = {q for m in W._ASK_QUESTION["train"].values() for v in m.values() for q in v}
    qs_held = {q for m in W._ASK_QUESTION["heldout"].values() for v in m.values() for q in v}
    assert not qs_train & qs_held and not {q.lower() for q in qs_held} & {q for m in W._QUESTIONS.values() for q, _ in m.values()}
    for task in ("t2i", "t2a", "t2v", "i2t", "a2t", "v2t"):
        for _ in range(20):
            d = W.sample_dialogue(g, "heldout", tasks=[task], render_media=False)
            r = W.rephrase(d, g, "heldout")
            assert r.target == d.target and r.question == d.question
            text = r.turns[0]["content"][-1]["text"]
            if task.startswith("t2"):
                assert r.asked is not None and all(
                    getattr(r.asked, f) in (None, getattr(d.target, f)) for f in r.asked.field_names())
                assert r.asked.caption().split()[-1].lower() in text.lower()


def test_sessions_mix_turns_and_edits_act_on_the_last_medium():
    g = np.random.default_rng(6)
    kinds = set()
    for _ in range(60):
        s = W.sample_session(g, "heldout", forms=None, render_media=False)
        assert 3 <= len(s.checks) <= 5 and len(s.turns) == 2 * len(s.checks)
        last = None
        for c in s.checks:
            kinds.add(c["kind"])
            user, reply = s.turns[c["turn"]], s.turns[c["turn"] + 1]
            assert user["role"] == "user" and reply["role"] == "assistant"
            if c["kind"] == "edit":
                assert type(c["target"]) is type(last) and c["target"] != last
                changed = [f for f in c["target"].field_names() if getattr(c["target"], f) != getattr(last, f)]
                assert len(changed) == 1
            else:
                assert W.is_held_out(c["target"])
            if c["kind"] != "question":
                last = c["target"]
    assert kinds == {"generate", "edit", "question"}


def test_copy_tasks_never_put_a_held_out_pair_together():
    g = np.random.default_rng(7)
    banned = W._held_out_pairs()
    for _ in range(300):
        d = W.sample_copy(g)
        (_, ask), (_, answer) = d.texts()
        words = answer.split()
        assert answer in ask and not any((a, b) in banned or (b, a) in banned for a, b in zip(words, words[1:]))
