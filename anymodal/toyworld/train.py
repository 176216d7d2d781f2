"""``anymodal toyworld train``: train the toy world's components from scratch, phase by phase.

This module is the public entry: :func:`train`, :class:`ToyworldTrainConfig` and :data:`PHASES`.
The code lives in modules named for what they hold:

    recipe.py           every phase's settings (``ToyworldTrainConfig``, its presets and defaults)
    runner.py           ``train`` and ``run_phase``: order, requirements, the parallel scheduler, results
    loop.py             what the phases share: ``train_loop`` (checkpointed, resumable), ``EMA``,
                        ``cosine_lr``, ``JsonlLog``, ``RunControl``, ``ThreadShare``, devices, atomic writes
    diffusion.py        what the generator phases share: VAE and denoiser training, latents, evaluation
    tokenizer.py, image_generator.py, audio_generator.py, video_generator.py, manifests.py, encoder.py,
    llm.py, stages.py   one module per phase (image_generator.py holds the image-vae phase too)
    ship.py             ``anymodal toyworld ship``: a finished run's pipeline into the package

Phases (run in this order; each one resumable)
    tokenizer        a word-level tokenizer (``tokenizers`` WordLevel + Whitespace, lowercased, with
                     ``[PAD]``/``[UNK]``/``<s>``/``</s>``) over every caption and dialogue text the
                     world produces, saved as a transformers ``PreTrainedTokenizerFast`` directory.
    image-vae        the image generator's tiny ``AutoencoderKL`` (64x64x3 -> 16x16x8), trained for
                     reconstruction on the world's images (train split only). The image and video
                     generators both encode with it, so it is a phase of its own: the video
                     generator trains beside the image UNet instead of after it.
    image-generator  a diffusers ``StableDiffusionPipeline`` at tiny size on the world's 64x64
                     images (train split only): a ``UNet2DConditionModel`` and a tiny
                     ``CLIPTextModel`` trained jointly on the image VAE's latents (v-prediction,
                     ``squaredcos_cap_v2`` DDPM, AdamW with warmup + cosine, EMA, 10% caption
                     dropout). It is saved with a ``DPMSolverMultistepScheduler`` (sample with 20
                     steps and guidance 3) and loads with ``StableDiffusionPipeline.from_pretrained``
                     and through anymodal's ``stable-diffusion`` generator adapter.
    audio-generator  a diffusers ``AudioLDMPipeline`` at tiny size on the world's tones (train split
                     only): 64x64 log-mel spectrograms (64 frames x 64 HTK bands, n_fft 1024, hop
                     256), a one-channel ``AutoencoderKL`` (-> 16x16x8), a ``UNet2DConditionModel``
                     conditioned through a class embedding on a tiny ``ClapTextModelWithProjection``
                     (AudioLDM's layout), and a weightless Griffin-Lim vocoder
                     (:class:`anymodal.generators.vocoders.GriffinLimVocoder`, NNLS mel inversion) in
                     the vocoder's place. Loads through anymodal's ``audioldm`` adapter.
    video-generator  a diffusers ``TextToVideoSDPipeline`` at tiny size (Zeroscope's layout) on the
                     world's 8-frame 32x32 videos (train split only), encoding frames with the image
                     VAE; loads through anymodal's ``text-to-video`` adapter.
    manifests        the training data as files (PNG, WAV, GIF) and anymodal.training manifests
                     (``data/``), sized by the ``stages`` settings.
    encoder          a tiny ImageBind (image, audio, video), trained with one linear classifier per
                     world field on its pooled embedding.
    llm              a tiny Llama pretrained on world dialogues, with the tokenizer plus anymodal's tokens.
    stages           anymodal stages 1, 2, 3 on the components above and the generators; LoRA merged,
                     saved to ``final/`` and scored with ``anymodal eval``'s checkers.
    A phase refuses to start, naming the command to run, when a phase it reads from has not
    finished; see :data:`~anymodal.toyworld.runner.REQUIRES`.

Layout of ``--out`` (default ``runs/toyworld``)
    tokenizer/, image-vae/, image-generator/, audio-generator/, video-generator/, data/, encoder/, llm/,
    final/                         the finished, loadable components (final/: the whole pipeline)
    stages/stage<N>/               the anymodal.training runs of the stages phase
    state/<phase>/                 checkpoints (``*.ckpt``, written to a temporary file and
                                   ``os.replace``d), cached latents, the phase's settings
                                   (``config.json``) and, once finished, ``done.json``
    logs/<phase>.jsonl             one record per logged step, per checkpoint and per evaluation

Resuming
    Every random draw of a training loop (batch indices, noise, timesteps, caption dropout, the
    VAE's posterior sample) comes from one ``torch.Generator`` whose state is checkpointed with
    the weights, the optimiser and the EMA; the learning rate is a pure function of the step.
    On CPU with a fixed thread count, stopping at a checkpoint and resuming therefore gives
    bit-identical weights to an uninterrupted run (``tests/test_toyworld_train.py`` checks it).
    Evaluation runs under a forked RNG with its own seeds, so it does not disturb training.

Evaluation
    Each generator phase samples prompts from seen (train split) and held-out combinations
    (colour x shape for images, note x waveform for audio, colour x direction and colour x shape
    for video), generates through its anymodal adapter and scores the outputs with
    :mod:`anymodal.toyworld.checkers` (no learned model). Figures go to the phase log and to
    ``<results>/toyworld-<phase>.json``.
"""

from __future__ import annotations

from .recipe import PRESETS, ToyworldTrainConfig
from .runner import OUTPUTS, PHASES, REQUIRES, PhaseResult, run_phase, train

__all__ = ["OUTPUTS", "PHASES", "PRESETS", "PhaseResult", "REQUIRES", "ToyworldTrainConfig", "run_phase", "train"]
