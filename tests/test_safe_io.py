"""Images checked before they are decoded, and the directory swap's crash recovery."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from anymodal.media import MAX_IMAGE_PIXELS, MediaError, check_image_size, open_image_checked
from anymodal.utils import recover_swapped_dir, swap_dir_into_place


def _png(width: int, height: int, mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- open_image_checked
def test_a_good_image_opens_decoded_with_its_format(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (10, 14, 3), np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    for source in (tmp_path / "a.png", str(tmp_path / "a.png"), (tmp_path / "a.png").read_bytes()):
        img = open_image_checked(source)
        assert img.format == "PNG" and img.size == (14, 10)
        assert np.array_equal(np.asarray(img), arr)


@pytest.mark.parametrize("size, match", [
    ((20000, 20000), "pixels allowed"),             # a 389 KB decompression bomb: PIL's own limit, reworded
    ((8000, 8000), "pixels is more than"),          # 64 MP: over our limit, under PIL's
    ((1, 50000), "aspect ratio 1 x 50000"),         # 274 bytes that a short-side resize makes 2.5 G pixels
    ((3000, 100), "aspect ratio 3000 x 100"),
])
def test_bombs_and_extreme_aspect_ratios_are_refused_before_decoding(size, match):
    data = _png(*size)
    tracemalloc.start()
    try:
        with pytest.raises(MediaError, match=match):
            open_image_checked(data, name="'x.png'")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2 ** 20, f"{peak / 2 ** 20:.0f} MiB allocated: the pixels were decoded"


def test_limits_are_arguments_and_errors_name_the_source(tmp_path):
    assert open_image_checked(_png(100, 1), max_aspect=100).size == (100, 1)
    with pytest.raises(MediaError, match=r"'x.png'.*pixels is more than the 100 allowed"):
        open_image_checked(_png(20, 20), max_pixels=100, name="'x.png'")
    with pytest.raises(MediaError, match="empty"):
        check_image_size(0, 5, "x")
    check_image_size(8160, 6120, "a 50-MP phone photo")  # fits the default
    assert 8160 * 6120 <= MAX_IMAGE_PIXELS
    with pytest.raises(MediaError, match="not an image file"):
        open_image_checked(b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>")
    with pytest.raises(MediaError, match="truncated"):
        arr = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        open_image_checked(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(MediaError, match=f"'{tmp_path / 'none.png'}': file not found"):
        open_image_checked(tmp_path / "none.png")
    with pytest.raises(MediaError, match="directory"):
        open_image_checked(tmp_path)


def test_the_encoders_load_images_through_the_check(tmp_path):
    from anymodal.encoders.preprocess import load_image

    (tmp_path / "strip.png").write_bytes(_png(1, 50000, "RGB"))
    with pytest.raises(MediaError, match="aspect ratio"):
        load_image(tmp_path / "strip.png")


# ---------------------------------------------------------------- the directory swap
def _make(directory, text):
    directory.mkdir()
    (directory / "f.txt").write_text(text)
    return directory


def test_a_crash_between_the_two_renames_is_recovered_on_load(tmp_path):
    """Kill a real process between the swap's two renames, then load: the old copy comes back."""
    target = _make(tmp_path / "session", "old")
    new = _make(tmp_path / ".session.abc.tmp", "new")
    script = textwrap.dedent(f"""
        import os
        from anymodal import utils
        calls = []
        real = os.replace
        def replace(a, b):
            calls.append(a)
            if len(calls) == 2:
                os._exit(9)  # the kill: the old directory is moved aside, the new one not yet in place
            real(a, b)
        utils.os.replace = replace
        utils.swap_dir_into_place({str(new)!r}, {str(target)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    olds = list(tmp_path.glob(".session.old-*"))
    assert not target.exists() and len(olds) == 1 and new.exists()  # the crash state of the issue

    assert recover_swapped_dir(target) is True
    assert (target / "f.txt").read_text() == "old"
    assert not list(tmp_path.glob(".session.old-*"))
    assert recover_swapped_dir(target) is False  # nothing more to do

    # the next swap goes through as usual
    swap_dir_into_place(new, target)
    assert (target / "f.txt").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["session"]


def test_a_chat_session_cut_mid_swap_loads_its_previous_save(tmp_path):
    from _taught import taught_pipeline

    from anymodal.session import ChatSession

    pipe = taught_pipeline()
    session = ChatSession(pipe)
    session.send("hello")
    saved = session.save(tmp_path / "s")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: the crashed saver
    os.replace(saved, tmp_path / f".s.old-{dead.pid}")
    _make(tmp_path / ".s.xyz.tmp", "half written")
    again = ChatSession.load(tmp_path / "s", pipe)
    assert [t.text for t in again.turns] == [t.text for t in session.turns]


def test_an_old_copy_of_a_running_process_is_left_alone(tmp_path):
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        old = _make(tmp_path / f".d.old-{alive.pid}", "theirs")
        assert recover_swapped_dir(tmp_path / "d") is False  # it is mid-swap: not ours to undo
        assert old.exists() and not (tmp_path / "d").exists()
    finally:
        alive.kill()
        alive.wait()
    assert recover_swapped_dir(tmp_path / "d") is True


def test_leftover_old_copies_beside_a_whole_directory_are_removed(tmp_path):
    _make(tmp_path / "d", "current")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _make(tmp_path / f".d.old-{dead.pid}", "stale")  # a crash after the second rename
    assert recover_swapped_dir(tmp_path / "d") is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_recovery_leaves_a_swap_in_flight_in_this_process_alone(tmp_path):
    """A reader's recovery racing a writer thread's swaps must never take the writer's old copy."""
    import threading

    target = _make(tmp_path / "d", "0")
    errors: list[BaseException] = []
    done = threading.Event()

    def writer():
        try:
            for k in range(1, 150):
                new = _make(tmp_path / f".d.{k}.tmp", str(k))
                swap_dir_into_place(new, target)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not done.is_set():
        recover_swapped_dir(target)
    thread.join()
    assert errors == []
    assert (target / "f.txt").read_text() == "149"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
