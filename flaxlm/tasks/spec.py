"""Task files: lm-evaluation-harness YAML with local data, read into a :class:`TaskSpec`.

    spec = load_task("shakespeare_next_line")                  # a shipped task
    spec = load_task("my_tasks/arc_local.yaml")                # a file
    spec = load_task("arc_local", include_paths=["my_tasks"])  # by its ``task:`` name

A task is the harness's own format, so ``flaxlm eval --tasks`` and ``flaxlm lm-eval`` read the
same file. Data is local only: ``dataset_path: json`` with ``dataset_kwargs.data_files`` (a
path, a list, or split -> path(s); JSON Lines or a JSON array). A relative data file is found
beside the YAML file first, then from the working directory (where the harness looks; ``flaxlm
lm-eval`` hands the harness copies whose paths are made absolute). Anything flaxlm's runner
does not implement (``!function`` hooks, filters, process_docs, ...) is refused in one line
that names the key; such tasks still run through ``flaxlm lm-eval``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
OUTPUT_TYPES = ("loglikelihood", "loglikelihood_rolling", "multiple_choice", "generate_until")
# The metrics flaxlm computes per output type (flaxlm/tasks/metrics.py), the first the default
METRICS = {
    "multiple_choice": ("acc", "acc_norm"),
    "loglikelihood": ("perplexity", "acc"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "generate_until": ("exact_match",),
}
DEFAULT_METRICS = {
    "loglikelihood": ("perplexity", "acc"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "multiple_choice": ("acc", "acc_norm"),
    "generate_until": ("exact_match",),
}
# Keys that only describe the task or change nothing flaxlm's runner computes.
_INERT_KEYS = {"tag", "group", "metadata", "should_decontaminate", "doc_to_decontamination_query",
               "dataset_name", "repeats", "output_type", "task", "task_alias"}  # fmt: skip
_SUPPORTED_KEYS = {"dataset_path", "dataset_kwargs", "training_split", "validation_split",
                   "test_split", "fewshot_split", "doc_to_text", "doc_to_target",
                   "doc_to_choice", "target_delimiter", "fewshot_delimiter", "description",
                   "num_fewshot", "fewshot_config", "generation_kwargs", "metric_list"}  # fmt: skip


class TaskError(ValueError):
    """A task that cannot be found, read or run; the message names the value and the fix."""


@dataclass
class TaskSpec:
    """One task, as its YAML says (harness field names), with its documents loaded."""

    name: str
    output_type: str
    source: Path
    docs: list[dict[str, Any]]  # the evaluated split (test_split, else validation_split)
    fewshot_docs: list[dict[str, Any]]  # the split few-shot examples are drawn from
    fewshot_is_eval_split: bool  # the harness then never shows a document as its own example
    doc_to_text: Any
    doc_to_target: Any
    doc_to_choice: Any = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: str = ""
    num_fewshot: int = 0
    fewshot_sampler: str = "default"
    generation_kwargs: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)  # metric_list entries
    config: dict[str, Any] = field(default_factory=dict)  # the YAML as read


class _TaskLoader(yaml.SafeLoader):
    """Safe YAML that refuses the harness's ``!function`` hooks in one line."""


def _refuse_tag(loader: yaml.Loader, suffix: str, node: yaml.Node) -> Any:
    raise TaskError(
        f"YAML tag !{suffix} at line {node.start_mark.line + 1}: flaxlm's runner takes plain "
        "YAML tasks only (run Python hooks through `flaxlm lm-eval`)"
    )


_TaskLoader.add_multi_constructor("!", _refuse_tag)


def read_task_yaml(path: str | Path) -> dict[str, Any]:
    """The YAML of a task file as a dict; TaskError naming the file when it is not one."""
    path = Path(path)
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskLoader)
    except yaml.YAMLError as exc:
        raise TaskError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise TaskError(f"{path}: cannot read the task file: {exc.strerror}") from None
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise TaskError(f"{path}: a task file is a YAML mapping with a `task: NAME` entry")
    return config


def task_files(include_paths: list[str | Path] | None = None) -> dict[str, Path]:
    """Task name -> YAML file: the shipped tasks, then each include path (a later one wins,
    as the harness's --include_path does over its own tasks)."""
    found: dict[str, Path] = {}
    for folder in [BUILTIN_DIR, *map(Path, include_paths or [])]:
        if not folder.is_dir():
            raise TaskError(f"include path {str(folder)!r} is not a directory")
        for path in sorted(folder.rglob("*.yaml")):
            try:
                name = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskLoader).get("task")
            except (TaskError, yaml.YAMLError, AttributeError):
                continue  # not a task file (a group, a template); loading it by path says why
            if isinstance(name, str):
                found[name] = path
    return found


def builtin_tasks() -> list[str]:
    """The names of the tasks shipped in flaxlm/tasks/builtin."""
    return sorted(task_files())


def resolve_task(name_or_path: str | Path, include_paths: list[str | Path] | None = None) -> Path:
    """The YAML file of a task name (shipped or under ``include_paths``) or a path to one."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise TaskError(f"task file {str(path)!r} does not exist")
        return path
    files = task_files(include_paths)
    if str(name_or_path) not in files:
        where = f" or under {', '.join(map(str, include_paths))}" if include_paths else ""
        raise TaskError(
            f"task {str(name_or_path)!r} is not a shipped task ({', '.join(builtin_tasks())})"
            f"{where}, nor a .yaml file (add --include-path DIR for your own)"
        )
    return files[str(name_or_path)]


def load_task(name_or_path: str | Path, include_paths: list[str | Path] | None = None) -> TaskSpec:
    """Reads and checks a task and loads its documents (module doc). Raises TaskError."""
    path = resolve_task(name_or_path, include_paths)
    config = read_task_yaml(path)
    name = config["task"]
    unknown = sorted(set(config) - _SUPPORTED_KEYS - _INERT_KEYS)
    if unknown:
        raise TaskError(
            f"task {name!r} ({path}): key {unknown[0]!r} is not supported by flaxlm's runner "
            f"(it reads {', '.join(sorted(_SUPPORTED_KEYS))}); run it through `flaxlm lm-eval`"
        )
    output_type = config.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise TaskError(
            f"task {name!r}: output_type={output_type!r} is not one of {', '.join(OUTPUT_TYPES)}"
        )
    splits = load_splits(config, path)
    eval_split = config.get("test_split") or config.get("validation_split")
    if not eval_split:
        raise TaskError(f"task {name!r}: set test_split or validation_split")
    return TaskSpec(
        name=name,
        output_type=output_type,
        source=path,
        docs=_split(splits, eval_split, name),
        fewshot_docs=_split(splits, fewshot_split(config), name) if fewshot_split(config) else [],
        # the harness compares the fewshot_split key itself (unset == unset counts)
        fewshot_is_eval_split=config.get("fewshot_split") == config.get("test_split"),
        doc_to_text=config.get("doc_to_text"),
        doc_to_target=config.get("doc_to_target"),
        doc_to_choice=config.get("doc_to_choice"),
        target_delimiter=config.get("target_delimiter", " "),
        fewshot_delimiter=config.get("fewshot_delimiter", "\n\n"),
        description=config.get("description") or "",
        num_fewshot=int(config.get("num_fewshot") or 0),
        fewshot_sampler=_sampler(config, name),
        generation_kwargs=dict(config.get("generation_kwargs") or {}),
        metrics=_metrics(config, output_type, name),
        config=config,
    )


def fewshot_split(config: dict[str, Any]) -> str | None:
    """Where few-shot examples come from, as the harness picks: ``fewshot_split``, else the
    training split, else the validation split, else the test split."""
    for key in ("fewshot_split", "training_split", "validation_split", "test_split"):
        if config.get(key):
            return config[key]
    return None


def _split(splits: dict[str, list[dict]], name: str, task: str) -> list[dict[str, Any]]:
    if name not in splits:
        raise TaskError(f"task {task!r}: split {name!r} is not in its data ({', '.join(splits)})")
    return splits[name]


def _sampler(config: dict[str, Any], name: str) -> str:
    sampler = (config.get("fewshot_config") or {}).get("sampler", "default")
    if sampler not in ("default", "first_n"):
        raise TaskError(f"task {name!r}: fewshot_config.sampler={sampler!r} is not default/first_n")
    return sampler


def _metrics(config: dict[str, Any], output_type: str, name: str) -> list[dict[str, Any]]:
    entries = config.get("metric_list") or [{"metric": m} for m in DEFAULT_METRICS[output_type]]
    for entry in entries:
        metric = entry.get("metric") if isinstance(entry, dict) else entry
        if metric not in METRICS.get(output_type, ()):
            raise TaskError(
                f"task {name!r}: metric {metric!r} is not one flaxlm computes for {output_type} "
                f"({', '.join(METRICS[output_type])})"
            )
    return [e if isinstance(e, dict) else {"metric": e} for e in entries]


def load_splits(config: dict[str, Any], source: Path) -> dict[str, list[dict[str, Any]]]:
    """Split name -> documents of a ``dataset_path: json`` task (module doc)."""
    name = config["task"]
    if config.get("dataset_path") != "json":
        raise TaskError(
            f"task {name!r}: dataset_path={config.get('dataset_path')!r}; flaxlm reads local "
            "data only: dataset_path: json with dataset_kwargs.data_files"
        )
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if not files:
        raise TaskError(f"task {name!r}: dataset_kwargs.data_files is missing")
    if not isinstance(files, dict):
        files = {"train": files}  # as the json builder does
    splits = {}
    for split, paths in files.items():
        paths = [paths] if isinstance(paths, str) else list(paths)
        splits[split] = [doc for p in paths for doc in read_docs(data_file(p, source), name)]
    return splits


def data_file(path: str, task_file: Path) -> Path:
    """A data file as written in a task: absolute; beside the task file; or from the working
    directory. FileNotFoundError (TaskError) naming where it looked."""
    p = Path(path).expanduser()
    for candidate in [p] if p.is_absolute() else [task_file.parent / p, p]:
        if candidate.is_file():
            return candidate.resolve()
    raise TaskError(f"{task_file}: data file {path!r} not found (beside the task file or in .)")


def read_docs(path: Path, task: str) -> list[dict[str, Any]]:
    """The documents of a JSON Lines file, or of a JSON file holding an array of objects."""
    text = path.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            docs = json.loads(text)
        else:
            docs = [json.loads(line) for line in text.split("\n") if line.strip()]
    except json.JSONDecodeError as exc:
        raise TaskError(f"task {task!r}: {path} is not JSON Lines: {exc}") from None
    if not all(isinstance(d, dict) for d in docs):
        raise TaskError(f"task {task!r}: {path}: every document must be a JSON object")
    return docs
