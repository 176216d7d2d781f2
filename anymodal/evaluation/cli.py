"""``anymodal eval``: the toy world's analytic scoring (``--task toyworld``, the default) or a
benchmark task on the user's own copy of its data (``--task t2i --data DIR --out DIR``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .tasks import TASKS, EvalRun, FeatureOptions, Features, check_template, generate, markdown, select


def eval_args(p: argparse.ArgumentParser) -> None:
    from ..toyworld.evaluate import eval_args as toyworld_args

    toyworld_args(p)  # --model/--config, --n, --split, --directions, --seed, --batch-size, --out
    for action in p._actions:  # --out is shared: say what it is for each kind of task
        if action.dest == "out":
            action.help = "toyworld: a JSON file for the results; benchmark tasks: the output folder (required)"
    g = p.add_argument_group("benchmark tasks (see docs/evaluation.md)")
    g.add_argument("--task", default="toyworld", choices=["toyworld", *TASKS],
                   help="toyworld (default: the toy world's analytic checkers), or a benchmark: "
                        + "; ".join(f"{t.name}: {', '.join(t.metrics)}" for t in TASKS.values()))
    g.add_argument("--data", metavar="DIR", help="the benchmark's folder, in its released layout")
    g.add_argument("--data-split", default=None, metavar="NAME",
                   help="which annotation file (a part of its name, e.g. val2014) or MSR-VTT split (default test)")
    g.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N items of the fixed sample order")
    g.add_argument("--prompt", default=None, help="the prompt template ({caption} / {question}; <image> etc. mark the "
                                                  "given medium); default: the task's")
    g.add_argument("--max-new-tokens", type=int, default=None, help="most tokens the LLM may generate per item (default: the model's llm.max_new_tokens)")
    g.add_argument("--fid-weights", default=None, metavar="FILE",
                   help="t2i: torch-fidelity's Inception weights pt_inception-2015-12-05-6726825d.pth")
    g.add_argument("--fid-features", choices=["inception", "clip"], default="inception",
                   help="t2i: features of FID and KID (clip: the --clip-model's image embeddings; not comparable "
                        "with papers)")
    g.add_argument("--clip-model", default=None, metavar="DIR", help="t2i, t2v: a local CLIP folder (CLIPScore, CLIPSIM)")
    g.add_argument("--clap-model", default=None, metavar="DIR",
                   help="t2a: a local CLAP folder (CLAP score; FAD too with --fad-model clap)")
    g.add_argument("--vggish-weights", default=None, metavar="FILE",
                   help="t2a: VGGish weights, torchvggish's vggish-10086976.pth (or a .safetensors): FAD over VGGish, "
                        "as papers report it")
    g.add_argument("--fad-model", choices=["vggish", "clap"], default=None,
                   help="t2a: the embedding of FAD (default: vggish when --vggish-weights is given, else clap; "
                        "FAD over CLAP is not comparable with papers)")
    g.add_argument("--meteor", choices=["auto", "on", "off"], default="auto",
                   help="captioning: METEOR (needs Java; auto: where Java is present)")
    g.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples of the 95%% intervals (default 1000)")


def eval_command(args: argparse.Namespace) -> int:
    if args.task == "toyworld":
        from ..toyworld.evaluate import eval_command as toyworld_command

        return toyworld_command(args)
    return benchmark_command(args)


def benchmark_command(args: argparse.Namespace) -> int:
    import torch

    from ..batch import _distributed_state, merge_results
    from ..commands import load_pipeline
    from .tasks import GENERATION_DIR

    task = TASKS[args.task]
    if not args.data:
        raise ValueError(f"--task {task.name} needs --data DIR: the {task.dataset} folder (see docs/evaluation.md)")
    if not args.out:
        raise ValueError(f"--task {task.name} needs --out DIR: where generated outputs, scores and the summary go")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    options = FeatureOptions(fid_weights=args.fid_weights, fid_features=args.fid_features, clip_model=args.clip_model,
                             clap_model=args.clap_model, fad_model=args.fad_model, vggish_weights=args.vggish_weights,
                             meteor=args.meteor, device=args.device)
    if args.prompt is not None:
        check_template(task, args.prompt)
    ds, items = select(task, args.data, args.data_split, args.limit)
    features = Features.load(task, options)  # a missing feature network fails before anything is generated
    state = _distributed_state()
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    device = args.device
    if device is None and state is not None and state.device.type != "cpu":
        device = str(state.device)
    torch.manual_seed(args.seed)  # every process builds the same randomly initialised components
    pipe = load_pipeline(args.model, args.config, device)
    model = args.model or args.config or "anymodal default"
    try:
        counts = generate(task, pipe, items, out, template=args.prompt, seed=args.seed, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens, progress=not args.no_progress, process_index=rank,
                          num_processes=world)
    except KeyboardInterrupt:
        print("interrupted; every recorded item is complete: run the same command again to go on", file=sys.stderr)
        return 130
    where = f"[process {rank}/{world}] " if world > 1 else ""
    print(f"{where}generation: {counts['generated']} generated, {counts['errors']} failed, {counts['skipped']} skipped "
          "(done by an earlier run)", file=sys.stderr)
    if world > 1:
        state.wait_for_everyone()
        if not state.is_main_process:
            state.wait_for_everyone()
            return 0
        merge_results(out / GENERATION_DIR)
    run = EvalRun(task, Path(args.data), out, args.data_split, args.limit, args.seed, args.prompt, model,
                  args.bootstrap, options)
    summary = run.summarise(ds, items, features, progress=not args.no_progress)
    print(markdown(summary))
    print(f"written: {out / 'summary.json'}, {out / 'summary.md'}, {out / 'scores.jsonl'}", file=sys.stderr)
    if world > 1:
        state.wait_for_everyone()
    return 0
