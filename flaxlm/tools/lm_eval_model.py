"""flaxlm as an lm-evaluation-harness model (``pip install 'flaxlm[eval]'``).

    flaxlm lm-eval --model flaxlm --model_args run_dir=runs/gpt_demo,step=300 \\
        --tasks shakespeare_next_line --num_fewshot 5

    import lm_eval
    from flaxlm.tools.lm_eval_model import FlaxLM, task_manager
    lm_eval.simple_evaluate(model=FlaxLM(run_dir="runs/gpt_demo"), tasks=["hellaswag_local"],
                            task_manager=task_manager(["my_tasks"]))

The harness discovers no plugins, so :func:`register` adds ``flaxlm`` to its model registry
(``flaxlm lm-eval`` does it before handing the command line to the harness). The adapter only
forwards: every request goes to the :class:`~flaxlm.tasks.scorer.Scorer` that ``flaxlm eval
--tasks`` uses, so the two cannot disagree. ``model_args``: ``run_dir`` (a run dir or a
checkpoint folder), ``step`` (default: the newest intact), ``batch_size``, ``max_length``.

:func:`~flaxlm.tasks.harness.task_manager` (re-exported here) gives the harness flaxlm's
shipped tasks and your include paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flaxlm.tasks import Scorer, TaskError
from flaxlm.tasks.harness import require_lm_eval, task_manager
from flaxlm.tools.load import load_checkpoint

MODEL_NAME = "flaxlm"

try:
    from lm_eval.api.model import LM
except ImportError:  # the eval extra is missing: the adapter is unusable, the rest works
    LM = object  # type: ignore[misc,assignment]


class FlaxLM(LM):  # type: ignore[misc]
    """A flaxlm checkpoint as an lm_eval ``LM`` (module doc)."""

    def __init__(
        self,
        run_dir: str | None = None,
        step: int | str | None = None,
        batch_size: int | str | None = None,
        max_length: int | str | None = None,
        loaded: Any = None,
        **_harness_kwargs: Any,  # device, max_batch_size, ...: the mesh decides placement
    ):
        require_lm_eval()
        super().__init__()
        loaded = loaded if loaded is not None else _load(run_dir, step)
        size = int(batch_size) if str(batch_size or "").isdigit() else 0  # "auto" -> the run's
        self.scorer = Scorer(loaded, size, int(max_length or 0))

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood([tuple(r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        items = []
        for r in requests:
            kwargs = dict(r.args[1] or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            items.append((r.args[0], until, int(kwargs.get("max_gen_toks", 256))))
        return self.scorer.generate_until(items)  # stops at </s> too, as the harness's HF model

    @property
    def tokenizer_name(self) -> str:
        return "flaxlm"


def _load(run_dir: str | None, step: int | str | None) -> Any:
    if not run_dir:
        raise TaskError("--model flaxlm needs --model_args run_dir=RUN_DIR[,step=N]")
    path = Path(run_dir)
    if step not in (None, ""):
        path = path / "checkpoints" / str(int(step))
    return load_checkpoint(path)


def register() -> None:
    """Adds ``flaxlm`` to lm_eval's model registry (idempotent)."""
    require_lm_eval()
    from lm_eval.api.registry import get_model, register_model

    try:
        if get_model(MODEL_NAME) is FlaxLM:
            return
    except (KeyError, ValueError):
        pass
    register_model(MODEL_NAME)(FlaxLM)


__all__ = ["FlaxLM", "register", "task_manager"]
