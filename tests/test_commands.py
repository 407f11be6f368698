"""Every command on every shipped tiny config family (GPT, BERT MLM + NSP, unified), with
progress output on, as a user runs them: ``flaxlm <command> ...`` through ``main``.

Regressions this guards: ``flaxlm plan`` built GPT batch keys for every family (KeyError
'masked_weights' on BERT), and ``flaxlm train`` of a unified config printed a GPT-only field
at the end (KeyError 'perplexity').
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
from conftest import REPO

from flaxlm.cli import main

CONFIGS = ("gpt_tiny", "bert_tiny", "unified_tiny")
STEPS = 6
# What each family's train lines and eval report hold besides loss / val_loss.
TRAIN_FIELDS = {
    "gpt_tiny": ("accuracy",),
    "bert_tiny": ("mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy"),
    "unified_tiny": ("accuracy",),
}
EVAL_FIELDS = {
    "gpt_tiny": ("perplexity", "accuracy", "unigram_loss", "gain_over_unigram"),
    "bert_tiny": ("mlm_loss", "mlm_accuracy", "nsp_accuracy", "mlm_frequency_accuracy"),
    "unified_tiny": ("accuracy",),
}


def cli(*argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``flaxlm ARGV``."""
    with (
        contextlib.redirect_stdout(io.StringIO()) as out,
        contextlib.redirect_stderr(io.StringIO()) as err,
    ):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def overrides(name: str, corpus: Path, cache: Path, run_dir: Path) -> list[str]:
    return [
        str(REPO / "configs" / f"{name}.yaml"),
        f"data.paths=[{corpus}]",
        f"data.cache_dir={cache}",
        "data.val_fraction=0.34",
        f"train.run_dir={run_dir}",
        f"train.steps={STEPS}",
        "train.eval_every=3",
        "checkpoint.every=3",
        "train.progress=true",
    ]


@pytest.fixture(scope="module", params=CONFIGS)
def trained(request, small_corpus, tiny_cache_dir, tmp_path_factory):
    """(config name, its argv, run dir, exit code, stdout, stderr) of a short run."""
    name = request.param
    run_dir = tmp_path_factory.mktemp(name) / "run"
    argv = overrides(name, small_corpus, tiny_cache_dir, run_dir)
    code, out, err = cli("train", *argv)
    return name, argv, run_dir, code, out, err


def test_train(trained):
    name, _, run_dir, code, out, err = trained
    assert code == 0, err
    assert "step 3: val_loss " in out  # the mid-run eval line, above the progress bar
    assert f"step {STEPS}: val_loss " in out  # the end-of-run summary
    assert out.splitlines()[-1].startswith(f"done: step {STEPS}, val_loss ")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_lines] == list(range(1, STEPS + 1))
    for field in TRAIN_FIELDS[name]:
        assert all(0 <= r[field] < 20 for r in train_lines), field
    if name == "unified_tiny":  # each present objective's loss, beside the weighted total
        assert any(k.endswith("_loss") and k != "loss" for r in train_lines for k in r)
    assert [r["step"] for r in records if "val_loss" in r] == [3, STEPS]


def test_eval_matches_the_runs_own_evaluation(trained):
    """``flaxlm eval`` (tools/evaluate.py) on the batches the loop evaluated at the end
    (train.eval_batches=4 of train.batch_size rows) reports the loop's val_loss."""
    name, _, run_dir, code, _, _ = trained
    assert code == 0
    code, out, err = cli("eval", run_dir, "--max-batches", 4, "--json")
    assert code == 0, err
    report = json.loads(out)
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in final if "val_loss" in r][-1]
    assert report["step"] == STEPS
    assert math.isclose(report["val_loss"], final["val_loss"], rel_tol=1e-5)
    for field in EVAL_FIELDS[name]:
        assert math.isfinite(report[field]), field
    code, text, err = cli("eval", run_dir, "--max-batches", 2)  # the human-readable form
    assert code == 0, err
    assert "val_loss" in text and "report " in text


def test_plan(trained):
    name, argv, _, _, _, _ = trained
    code, out, err = cli("plan", *argv, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["bytes_per_device"] >= report["params_bytes"] + report["opt_state_bytes"] > 0
    # AdamW keeps two moments per fp32 parameter: twice the parameters' bytes.
    assert report["opt_state_bytes"] >= 2 * report["params_bytes"]
    assert report["params_bytes"] == 4 * report["n_params"]


def test_bench(trained):
    name, argv, _, _, _, _ = trained
    code, out, err = cli("bench", *argv, "--steps", 1, "--warmup", 0, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["tokens_per_s"] > 0
    assert 0 < report["mfu"] <= report["mfu_incl_head"] < 2


def test_data_inspect(trained):
    name, argv, _, _, _, _ = trained
    code, out, err = cli("data", "inspect", *argv, "--json")
    assert code == 0, err
    sample = json.loads(out)["sample"]
    assert sample["rows"] and all(row["text"] and row["predicted"] > 0 for row in sample["rows"])
    code, text, err = cli("data", "inspect", *argv)
    assert code == 0, err
    assert "batch of step 0" in text


def test_convert_round_trip_keeps_the_model(trained, small_corpus, tmp_path):
    """to-hf then from-hf gives a run whose loss on the same text is the original's."""
    pytest.importorskip("safetensors")
    name, _, run_dir, _, _, _ = trained
    if name == "unified_tiny":  # pre-LN: HF BERT cannot express it, and says so
        code, _, err = cli("convert", "to-hf", run_dir, tmp_path / "hf")
        assert code == 2 and "norm_placement" in err and len(err.strip().splitlines()) == 1
        return
    assert cli("convert", "to-hf", run_dir, tmp_path / "hf")[0] == 0
    hf_type = json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"]
    assert hf_type == {"gpt_tiny": "gpt2", "bert_tiny": "bert"}[name]
    assert cli("convert", "from-hf", tmp_path / "hf", tmp_path / "back", "--seq-len", 32)[0] == 0
    text = sorted(small_corpus.iterdir())[0]
    losses = []
    for run in (run_dir, tmp_path / "back"):
        code, out, err = cli(
            "eval", run, "--data", text, "--max-batches", 2, "--batch-size", 8, "--json"
        )
        assert code == 0, err
        losses.append(json.loads(out)["val_loss"])
    assert math.isclose(*losses, rel_tol=1e-6)


def test_generate_where_the_family_decodes(trained):
    name, _, run_dir, _, _, _ = trained
    code, out, err = cli(
        "generate", run_dir, "--prompt", "HAMLET.", "--max-new-tokens", 8, "--no-stop-at-eos",
        "--json",
    )  # fmt: skip
    if name == "gpt_tiny":
        assert code == 0, err
        row = json.loads(out)
        assert row["prompt"] == "HAMLET." and row["completion"]  # 8 tokens of 6-step text
    else:
        assert code == 2
        assert "generation needs a decoder" in err and len(err.strip().splitlines()) == 1


def test_a_llama_style_run_trains_converts_to_llama_and_generates(
    small_corpus, tiny_cache_dir, tmp_path
):
    """configs/llama_tiny.yaml (RMSNorm, SwiGLU, RoPE, GQA, untied) through the CLI: train,
    convert to-hf (a LlamaForCausalLM directory) and generate (its KV cache holds 2 heads)."""
    pytest.importorskip("safetensors")
    run_dir = tmp_path / "run"
    code, out, err = cli("train", *overrides("llama_tiny", small_corpus, tiny_cache_dir, run_dir))
    assert code == 0, err
    assert out.splitlines()[-1].startswith(f"done: step {STEPS}, val_loss ")
    assert cli("convert", "to-hf", run_dir, tmp_path / "hf")[0] == 0
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hf["model_type"], hf["num_key_value_heads"]) == ("llama", 2)
    code, out, err = cli("generate", run_dir, "--prompt", "HAMLET.", "--max-new-tokens", 8,
                         "--no-stop-at-eos", "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["completion"]
