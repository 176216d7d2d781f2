"""Mutation testing of anymodal's core behaviour: does the test suite notice what a user would notice?

Each entry of ``MUTATIONS`` is one small change of library code (a file, a snippet that must occur
in it exactly once, and its replacement) and the tests that must fail when it is made. The script
copies the repository's tracked files into a temporary directory, checks that those tests pass
there unchanged, then applies each mutation in turn to the copy, runs its tests, and restores the
file. A mutation is *killed* when its tests fail. It reports the kill ratio and writes every result
to ``bench/results/mutations.json``. Run it before a release (docs/testing.md)::

    python bench/mutations.py                      # every mutation (about 20-30 min on 2 busy cores)
    python bench/mutations.py --only rngs-seed-plus-k-to-seed --only session-file-index-dropped
    python bench/mutations.py --list               # names and what a user would notice

The copy is imported in place of the installed package: ``PYTHONPATH`` puts the copy first, and
links inside its ``anymodal/`` stand in for the ``package-dir`` mapping of ``encoders/``,
``generators/`` and ``configs/`` (pyproject.toml). Bytecode is not written, so a mutated file is
never shadowed by a stale ``.pyc``. Tests named here must run in this process tree only (no test
that starts ``python -m anymodal`` with its own ``PYTHONPATH``).

A snippet that is no longer in its file is an *error*, not a kill: update the entry when the code
it mutates changes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "mutations.json"
# anymodal.<name> lives at the top level of the repository (pyproject.toml's package-dir)
PACKAGE_DIRS = {"encoders": "encoders", "generators": "generators", "configs": "configs"}
WHAT = "tests/test_what_users_see.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    notice: str  # what a user would notice


MUTATIONS: list[Mutation] = [
    # ---------------------------------------------------------------- the 7 survivors of issue 24
    Mutation("audio-save-int16", "anymodal/media.py",
             "data = np.asarray(self.array, dtype=np.float32)",
             "data = np.asarray(self.array, dtype=np.int16)",
             (f"{WHAT}::test_a_saved_wav_holds_the_waveform",
              f"{WHAT}::test_generated_audio_written_by_the_cli_is_the_generated_waveform"),
             "every saved WAV is silent"),
    Mutation("keep-audio-wrong-rate", "anymodal/media.py",
             'np.asarray(audio.array, np.float32), audio.sample_rate, format="WAV", subtype="FLOAT"',
             'np.asarray(audio.array, np.float32), 16000, format="WAV", subtype="FLOAT"',
             (f"{WHAT}::test_a_sessions_audio_keeps_its_rate_and_samples_on_reload",),
             "a reloaded session plays its audio at the wrong speed"),
    Mutation("session-file-index-dropped", "anymodal/session.py",
             'f"{n:04d}_{turn.role}_{m.value}_{k}"', 'f"{n:04d}_{turn.role}_{m.value}"',
             (f"{WHAT}::test_every_medium_of_a_turn_survives_save_and_reload",),
             "two images sent in one turn come back as one image twice"),
    Mutation("rngs-seed-plus-k-to-seed", "anymodal/pipeline.py",
             "torch.Generator().manual_seed(seed + k) for _, k in owners",
             "torch.Generator().manual_seed(seed) for _, k in owners",
             (f"{WHAT}::test_media_k_of_a_prompt_use_seed_plus_k_alone_or_in_a_batch",
              f"{WHAT}::test_a_batch_row_gives_what_the_same_prompt_gives_alone"),
             "the images of one reply all start from the same noise"),
    Mutation("rngs-seed-plus-row", "anymodal/pipeline.py",
             "torch.Generator().manual_seed(seed + k) for _, k in owners",
             "torch.Generator().manual_seed(seed + row) for row, k in owners",
             (f"{WHAT}::test_media_k_of_a_prompt_use_seed_plus_k_alone_or_in_a_batch",
              f"{WHAT}::test_a_batch_row_gives_what_the_same_prompt_gives_alone"),
             "a prompt gives another image in a batch than alone"),
    Mutation("untied-head-rows-not-saved", "anymodal/pipeline.py",
             "    if out_emb is not None and not tied:\n",
             "    if False:\n",
             ("tests/test_core.py::test_untied_head_rows_of_added_tokens_round_trip",),
             "a reloaded model (untied head) no longer emits its signal tokens as trained"),
    Mutation("stage-unfreezes-whole-projector-group", "anymodal/training/stages.py",
             "keys = [mod] if mod else list(table)", "keys = list(table)",
             ("tests/test_training.py::test_a_stage_naming_one_modality_trains_that_projector_alone",),
             "training the image projector also changes the audio one"),
    # ---------------------------------------------------------------- other core behaviour
    Mutation("session-reply-seed-not-advanced", "anymodal/session.py",
             'seed = self.seed + sum(1 for t in self.turns if t.role == "assistant")',
             "seed = self.seed",
             ("tests/test_session.py::test_multi_turn_with_media_in_and_out",),
             "every reply of a session is drawn with the same seed"),
    Mutation("session-context-never-shortened", "anymodal/session.py",
             'starts = [i for i, t in enumerate(turns) if t.role == "user"] or [0]',
             "starts = [0]",
             ("tests/test_session.py::test_context_policy_drops_oldest_exchanges_and_keeps_the_system_prompt",),
             "a long chat fails instead of dropping its oldest exchanges"),
    Mutation("signal-block-started-past-budget", "anymodal/generation.py",
             "            if length > remaining:\n", "            if False:\n",
             ("tests/test_core.py::test_signal_span_forcing",),
             "a reply cut by max_new_tokens ends in half a signal block"),
    Mutation("signal-block-not-forced", "anymodal/generation.py",
             "                    scores[row, forced] = 0.0\n", "                    pass\n",
             ("tests/test_core.py::test_signal_span_forcing",),
             "a started signal block is not completed: no medium"),
    Mutation("media-count-not-checked", "anymodal/model.py",
             "            if n_pos != n_feat:\n", "            if False:\n",
             ("tests/test_pipeline.py::test_features_fill_exactly_the_placeholder_positions",),
             "media silently land on the wrong positions"),
    Mutation("typed-signal-tokens-not-escaped", "anymodal/processor.py",
             'mt.group(0)[0] + "\\u200b" + mt.group(0)[1:]', "mt.group(0)",
             ("tests/test_core.py::test_typed_signal_tokens_never_become_signal_ids",
              "tests/test_fuzz.py::test_typed_signal_tokens_stay_text"),
             "typing <img_0> in a prompt triggers image generation"),
    Mutation("placeholder-count-mismatch-accepted", "anymodal/processor.py",
             "            elif found[m] != n:\n", "            elif False:\n",
             ("tests/test_session.py::test_send_rejects_bad_input",),
             "a prompt with one <image> and two images gives a confusing error"),
    Mutation("placeholder-not-in-reply-text", "anymodal/processor.py",
             "                    pieces.append(m.spec.placeholder)\n", "                    pass\n",
             ("tests/test_session.py::test_multi_turn_with_media_in_and_out",),
             "the reply text no longer says where each generated medium goes"),
    Mutation("seed-upper-bound-dropped", "anymodal/inputs.py",
             "if not 0 <= int(seed) <= MAX_SEED:", "if int(seed) < 0:",
             ("tests/test_fuzz.py::test_bad_seeds",),
             "a seed of 2**64 fails deep inside torch"),
    Mutation("safe-stem-keeps-leading-dots", "anymodal/batch.py",
             '.lstrip(".-")[:_MAX_STEM]', "[:_MAX_STEM]",
             ("tests/test_batch.py::test_safe_stem_cannot_escape_or_hide",),
             "a batch id '..' or '.hidden' writes outside or hidden files"),
    Mutation("dialogue-loss-on-user-turns", "anymodal/training/data.py",
             "            if any(a <= start < b for a, b in spans):\n", "            if True:\n",
             ("tests/test_training.py::test_dialogue_loss_mask_covers_assistant_turns_only",
              "tests/test_training.py::test_dialogue_samples_learn_only_the_assistants_tokens"),
             "stage 3 learns to say what the user said"),
    Mutation("signal-delta-untied-head-uses-input-rows", "anymodal/training/stages.py",
             "delta = self.delta_in if self.tied else self.delta_out", "delta = self.delta_in",
             ("tests/test_training.py::test_signal_token_delta_trains_only_its_rows_and_folds_exactly",),
             "stage 2 trains the wrong head rows of an untied model"),
    Mutation("cli-error-exit-status", "anymodal/cli.py",
             "            print(f\"  {note}\", file=sys.stderr)\n        return 2\n",
             "            print(f\"  {note}\", file=sys.stderr)\n        return 1\n",
             ("tests/test_cli_errors.py",),
             "scripts cannot tell bad input (2) from other failures"),
    Mutation("huge-prompt-tokenised", "anymodal/processor.py",
             "if tokens is not None and len(text) > self.max_chars(tokens):", "if False:",
             ("tests/test_batch.py::test_a_huge_seed_or_prompt_fails_its_row_alone_and_is_refused_before_tokenising",),
             "a 30 MB prompt takes half a minute before it is refused"),
    Mutation("json-number-error-aborts-batch", "anymodal/batch.py",
             "            except ValueError as e:  # an integer of over 4300 digits",
             "            except KeyError as e:  # an integer of over 4300 digits",
             ("tests/test_batch.py::test_a_huge_seed_or_prompt_fails_its_row_alone_and_is_refused_before_tokenising",),
             "one bad line stops the whole batch run"),
    Mutation("image-size-multiple-unchecked", "generators/components.py",
             "if value is not None and value % self.size_multiple:", "if False:",
             ("tests/test_generators.py::test_generator_settings_are_checked_by_anymodal_naming_the_setting",),
             "height=7 fails inside diffusers, naming an argument the user never wrote"),
    Mutation("session-role-unchecked", "anymodal/session.py",
             '        if t["role"] not in ("user", "assistant"):\n', "        if False:\n",
             ("tests/test_session.py::test_a_bad_session_file_is_refused_at_load_naming_the_field",),
             "a corrupt session.json loads and fails later"),
    Mutation("animated-image-accepted", "anymodal/inputs.py",
             "        if probed is not None and probed[1]:\n", "        if False:\n",
             ("tests/test_fuzz.py::test_bad_image_files",),
             "an animated GIF given as an image is silently cut to its first frame"),
    Mutation("pickle-allowed-by-default", "anymodal/loading.py",
             'contextvars.ContextVar("anymodal_allow_pickle", default=False)',
             'contextvars.ContextVar("anymodal_allow_pickle", default=True)',
             ("tests/test_fuzz.py::test_pickle_weights_load_only_when_allowed",),
             "a downloaded .bin runs its code without --allow-pickle"),
    Mutation("no-header-deadline", "anymodal/ui/deadlines.py",
             "            super().connection_made(transport)\n            self._arm()\n",
             "            super().connection_made(transport)\n",
             ("tests/test_ui.py::test_every_connection_has_a_header_and_a_request_deadline",),
             "a slowloris client holds a server connection for ever"),
    Mutation("plugin-exit-ends-anymodal", "anymodal/registry.py",
             "        except BaseException as e:  # noqa: BLE001", "        except Exception as e:  # noqa: BLE001",
             ("tests/test_plugins.py::test_a_plugin_whose_import_exits_is_named_and_skipped",),
             "one broken plugin makes every anymodal command exit silently"),
]


# ==================================================================== running
def _copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in files.decode().split("\0"):
        if not rel:
            continue
        src = ROOT / rel
        if not src.is_file():  # deleted in the work tree, not yet committed
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    for name, folder in PACKAGE_DIRS.items():
        link = dest / "anymodal" / name
        if not link.exists():
            link.symlink_to(Path("..") / folder, target_is_directory=True)


def _env(copy: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _pytest(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int | None, float, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=--strict-markers",
           *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, time.perf_counter() - start, out[-2000:]
    return proc.returncode, time.perf_counter() - start, (proc.stdout + proc.stderr)[-2000:]


def _check_imports_come_from(copy: Path) -> None:
    probe = ("import anymodal, anymodal.generators, anymodal.encoders, anymodal.configs; "
             "print(anymodal.__file__); print(anymodal.generators.__file__); print(anymodal.encoders.__file__)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=copy, env=_env(copy), capture_output=True, text=True,
                         timeout=300)
    paths = out.stdout.split()
    if out.returncode or len(paths) != 3 or not all(Path(p).resolve().is_relative_to(copy.resolve()) for p in paths):
        raise SystemExit(f"the copy is not what gets imported ({paths or out.stderr[-500:]}); see the module docstring")


def run(mutations: list[Mutation], timeout: float, baseline: bool = True) -> dict:
    results = []
    with tempfile.TemporaryDirectory(prefix="anymodal-mutants-") as tmp:
        copy = Path(tmp)
        _copy_repo(copy)
        _check_imports_come_from(copy)
        if baseline:
            tests = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
            print(f"baseline: {len(tests)} test targets on the unmutated copy ...", flush=True)
            rc, seconds, out = _pytest(copy, tests, timeout * 2)
            if rc != 0:
                raise SystemExit(f"the named tests fail without any mutation (rc {rc}, {seconds:.0f} s); fix them "
                                 f"first:\n{out}")
            print(f"baseline passed in {seconds:.0f} s", flush=True)
        for n, m in enumerate(mutations, 1):
            path = copy / m.file
            source = path.read_text()
            found = source.count(m.original)
            record = {"name": m.name, "file": m.file, "tests": list(m.tests), "notice": m.notice}
            if found != 1:
                record.update(status="error", detail=f"the snippet occurs {found} times in {m.file} (must be once)")
            else:
                path.write_text(source.replace(m.original, m.replacement))
                try:
                    rc, seconds, out = _pytest(copy, m.tests, timeout)
                finally:
                    path.write_text(source)
                status = "killed" if rc != 0 else "survived"
                record.update(status=status, returncode=rc, seconds=round(seconds, 1),
                              detail="timed out" if rc is None else _summary(out))
            results.append(record)
            print(f"[{n}/{len(mutations)}] {record['status']:8s} {m.name} ({record.get('seconds', 0)} s)", flush=True)
    killed = sum(r["status"] == "killed" for r in results)
    valid = sum(r["status"] != "error" for r in results)
    return {
        "kill_ratio": round(killed / len(results), 4) if results else None,
        "killed": killed, "survived": sum(r["status"] == "survived" for r in results),
        "errors": len(results) - valid, "total": len(results),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mutations": results,
    }


def _summary(out: str) -> str:
    """The pytest lines that say what failed (or the last line when nothing did)."""
    lines = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return "\n".join(lines[:5]) or (out.strip().splitlines() or [""])[-1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", default=[], metavar="NAME", help="run this mutation (repeatable)")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per mutation's tests (default 900)")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the named tests")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS.relative_to(ROOT)})")
    p.add_argument("--target", type=float, default=0.95, help="exit 1 below this kill ratio (default 0.95)")
    args = p.parse_args(argv)
    names = [m.name for m in MUTATIONS]
    if len(set(names)) != len(names):
        raise SystemExit("two mutations share a name")
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:42s} {m.file:30s} {m.notice}")
        return 0
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        raise SystemExit(f"unknown mutation {unknown[0]!r}; see --list")
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    report = run(chosen, args.timeout, baseline=not args.no_baseline)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"killed {report['killed']} of {report['total']} ({report['kill_ratio']:.0%}); survived "
          f"{report['survived']}, errors {report['errors']}; results in {args.out}")
    for r in report["mutations"]:
        if r["status"] != "killed":
            print(f"  {r['status']}: {r['name']} ({r['file']}): {r['detail']}")
    return 0 if report["kill_ratio"] is not None and report["kill_ratio"] >= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
