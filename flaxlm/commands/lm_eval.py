"""``flaxlm lm-eval ARGS``: lm-evaluation-harness's own command line with flaxlm's model
registered as ``flaxlm`` and flaxlm's shipped tasks on its include path (``pip install
'flaxlm[eval]'``).

    flaxlm lm-eval --model flaxlm --model_args run_dir=runs/gpt_demo,step=300 \\
        --tasks shakespeare_next_line --num_fewshot 5 --include_path my_tasks
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "lm-eval",
        help="lm-evaluation-harness's CLI with --model flaxlm (the eval extra)",
        description="Every argument goes to lm-evaluation-harness's own command line "
        "(`lm_eval --help`); --model flaxlm --model_args run_dir=RUN_DIR[,step=N] runs a "
        "flaxlm checkpoint. flaxlm's shipped tasks are found without --include_path.",
        add_help=False,
        prefix_chars="+",  # so that --model & co. are the harness's, not ours
    )
    p.add_argument("harness_args", nargs=argparse.REMAINDER, help="lm_eval arguments")
    p.set_defaults(func=lm_eval_command)


def lm_eval_command(args: argparse.Namespace) -> int:
    from flaxlm.tasks.harness import require_lm_eval, resolved_task_dir

    require_lm_eval()
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # flaxlm's tasks read local files
    from lm_eval.__main__ import cli_evaluate

    from flaxlm.tools.lm_eval_model import register

    register()
    argv = harness_argv(list(args.harness_args), resolved_task_dir)
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exc:  # the harness exits on --help and on its own errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    finally:
        sys.argv = saved
    return 0


def harness_argv(argv: list[str], resolve) -> list[str]:
    """``argv`` with ``--include_path`` pointing at resolved copies of flaxlm's shipped tasks
    and the user's folders (flaxlm/tasks/harness.py), so both find their data files."""
    paths, out, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--include_path", "--include-path") and i + 1 < len(argv):
            paths.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith(("--include_path=", "--include-path=")):
            paths.append(arg.split("=", 1)[1])
        else:
            out.append(arg)
        i += 1
    if any(a in ("-h", "--help") for a in out):
        return out
    return [*out, "--include_path", str(resolve(paths))]
