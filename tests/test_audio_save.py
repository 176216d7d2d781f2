"""A saved WAV is the waveform it claims to be: never silently clipped (issue 20)."""

import logging

import numpy as np
import pytest
import soundfile as sf

from anymodal import Audio
from anymodal.media import SAVE_PEAK, MediaError


def test_an_over_full_scale_waveform_is_normalised_not_clipped(tmp_path, caplog):
    t = np.arange(16000) / 16000
    wave = (175 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)  # the vocoder's old scale
    with caplog.at_level(logging.WARNING, logger="anymodal.media"):
        Audio(wave, 16000).save(tmp_path / "a.wav")
    back, rate = sf.read(tmp_path / "a.wav")
    assert rate == 16000 and sf.info(str(tmp_path / "a.wav")).subtype == "PCM_16"
    assert abs(np.abs(back).max() - SAVE_PEAK) < 1e-3
    assert np.allclose(back, wave / 175 * SAVE_PEAK, atol=2 / 32767)  # the same waveform, only quieter
    assert "peaks at 175" in caplog.text and "normalised" in caplog.text


def test_an_in_range_waveform_is_written_as_it_is(tmp_path, caplog):
    wave = (0.5 * np.sin(np.linspace(0, 100, 8000))).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="anymodal.media"):
        Audio(wave, 8000).save(tmp_path / "b.wav")
    back, _ = sf.read(tmp_path / "b.wav")
    assert np.allclose(back, wave, atol=1 / 32767) and not caplog.text


def test_non_finite_samples_are_refused(tmp_path):
    with pytest.raises(MediaError, match="NaN or infinite"):
        Audio(np.array([0.0, np.nan], np.float32), 16000).save(tmp_path / "c.wav")
    assert not (tmp_path / "c.wav").exists()
