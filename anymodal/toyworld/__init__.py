"""The toy world: synthetic paired data for anymodal's tiny default model, and analytic checkers.

``world`` generates captions, images, tones, clips and dialogues from seeded specs;
``checkers`` reads media and answers back without any learned model. See each module's
docstring for the vocabulary, the caption grammar and how the checkers decide. ``evaluate`` is
``anymodal eval``; ``train`` (``anymodal toyworld train``) trains the default model's components
from scratch, and its docstring maps the modules that hold the recipe, the runner and each phase.
"""

from . import checkers, world
from .checkers import (AudioReading, ImageReading, VideoReading, check_answer, degrade_audio, degrade_image,
                       degrade_video, read_answer, read_audio, read_image, read_video, score_audio, score_image,
                       score_text, score_video)
from .world import (HELD_OUT, TASKS, AudioSpec, Bank, Dialogue, ImageSpec, Sample, Spec, VideoSpec, all_specs,
                    apply_edit, complete_spec, is_held_out, make_bank, parse_caption, render, render_audio,
                    render_image, render_video, sample, sample_dialogue, sample_specs)

__all__ = [
    "AudioReading", "AudioSpec", "Bank", "Dialogue", "HELD_OUT", "ImageReading", "ImageSpec", "Sample", "Spec",
    "TASKS", "VideoReading", "VideoSpec", "all_specs", "apply_edit", "check_answer", "checkers",
    "complete_spec", "degrade_audio", "degrade_image", "degrade_video", "is_held_out", "make_bank",
    "parse_caption", "read_answer", "read_audio", "read_image", "read_video", "render", "render_audio",
    "render_image", "render_video", "sample", "sample_dialogue", "sample_specs", "score_audio", "score_image",
    "score_text", "score_video", "world",
]
