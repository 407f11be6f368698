"""lm-evaluation-harness's view of flaxlm's task files (``pip install 'flaxlm[eval]'``).

:func:`task_manager` gives the harness flaxlm's shipped tasks and the include paths as
copies whose relative ``data_files`` are made absolute: the harness reads a relative data
file from the working directory, flaxlm's task files name theirs beside the YAML. Folders are
copied whole, so a task's Python hooks (``!function utils.fn``) still resolve. The model side
is flaxlm/tools/lm_eval_model.py.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from flaxlm.tasks.spec import BUILTIN_DIR, TaskError, data_file, read_task_yaml


def require_lm_eval() -> None:
    """A one-line TaskError unless lm-evaluation-harness is installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise TaskError(
            "lm-evaluation-harness is not installed: pip install 'flaxlm[eval]'"
        ) from None


def resolved_task_dir(include_paths: list[str | Path] | None = None) -> Path:
    """A folder of copies of the shipped tasks and those under ``include_paths`` with their
    data files made absolute (removed when the process exits)."""
    out = Path(tempfile.mkdtemp(prefix="flaxlm-tasks-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    for i, folder in enumerate([BUILTIN_DIR, *map(Path, include_paths or [])]):
        if not Path(folder).is_dir():
            raise TaskError(f"include path {str(folder)!r} is not a directory")
        shutil.copytree(folder, out / str(i), ignore=shutil.ignore_patterns("*.jsonl", "*.json"))
        for path in sorted(Path(folder).rglob("*.yaml")):
            try:
                config = read_task_yaml(path)
            except TaskError:
                continue
            files = (config.get("dataset_kwargs") or {}).get("data_files")
            if files is not None:
                config["dataset_kwargs"]["data_files"] = _absolute(files, path)
            target = out / str(i) / path.relative_to(folder)
            target.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return out


def _absolute(files: Any, task_file: Path) -> Any:
    if isinstance(files, dict):
        return {k: _absolute(v, task_file) for k, v in files.items()}
    if isinstance(files, list):
        return [_absolute(v, task_file) for v in files]
    return str(data_file(str(files), task_file))


def task_manager(
    include_paths: list[str | Path] | None = None, include_defaults: bool = True
) -> Any:
    """An lm_eval ``TaskManager`` that knows flaxlm's shipped tasks and ``include_paths``
    (and, with ``include_defaults``, the harness's own: indexing them takes seconds);
    offline, as every flaxlm task reads local files."""
    require_lm_eval()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    folder = str(resolved_task_dir(include_paths))
    return TaskManager(include_path=folder, include_defaults=include_defaults)
