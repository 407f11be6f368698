"""``flaxlm`` commands, called in-process through ``main`` and once as the installed script."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TRAINED_RUN_STEPS

from flaxlm.cli import main
from flaxlm.tokenizers.sentencepiece import SPECIAL_TOKENS, Tokenizer

TINY = str(REPO / "configs" / "gpt_tiny.yaml")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``flaxlm ARGV``."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def eval_json(capsys, *argv: str) -> dict:
    code, out, _ = run(capsys, "eval", *argv, "--json")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 1, out  # nothing else on stdout: the output pipes into jq & co.
    return json.loads(lines[0])


def test_train_with_overrides(cli_trained_run):
    """``flaxlm train configs/gpt_tiny.yaml key=value ...`` (run by the shared fixture)."""
    run_dir, code, out = cli_trained_run
    assert code == 0
    assert out.startswith(f"done: step {TRAINED_RUN_STEPS}, val_loss ")
    assert out.rstrip().endswith(f"run dir {run_dir}")
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["steps"] == TRAINED_RUN_STEPS  # the overrides reached the run
    assert saved["checkpoint"]["every"] == 50
    assert saved["data"]["val_fraction"] == 0.34
    checkpoints = sorted(int(p.name) for p in (run_dir / "checkpoints").glob("[0-9]*"))
    assert checkpoints == [100, 150, 200]


def test_eval_json_reports_loss_perplexity_and_tokens(capsys, trained_run):
    report = eval_json(capsys, str(trained_run))
    assert report["step"] == TRAINED_RUN_STEPS
    assert report["tokens"] > 10_000
    assert 0 < report["val_loss"] < math.log(384)
    assert report["perplexity"] == pytest.approx(math.exp(report["val_loss"]), rel=1e-12)
    assert "unigram_loss" in report

    # The human-readable form carries the same numbers.
    code, out, _ = run(capsys, "eval", str(trained_run), "--max-batches", "2")
    assert code == 0
    assert "checkpoint step      200" in out
    assert "perplexity" in out and "unigram baseline" in out


def test_eval_one_checkpoint_and_other_text(capsys, trained_run, small_corpus, tmp_path):
    older = eval_json(capsys, str(trained_run / "checkpoints" / "100"), "--max-batches", "2")
    assert older["step"] == 100
    assert older["tokens"] <= 2 * 8 * 32

    text = tmp_path / "sonnet.txt"
    text.write_text((small_corpus / "macbeth.txt").read_text()[:10_000])
    other = eval_json(capsys, str(trained_run), "--data", str(text))
    assert other["data"] == [str(text)]
    assert other["tokens"] > 500
    assert other["perplexity"] == pytest.approx(math.exp(other["val_loss"]), rel=1e-12)


def test_sample_is_reproducible(capsys, trained_run):
    greedy = ("sample", str(trained_run), "--prompt", "ROMEO.\n", "--max-new-tokens", "12")
    code, first, _ = run(capsys, *greedy)
    assert code == 0
    assert first.startswith("ROMEO.\n")
    assert run(capsys, *greedy)[1] == first

    hot = (*greedy, "--temperature", "1.0", "--seed", "7")
    _, a, _ = run(capsys, *hot)
    _, b, _ = run(capsys, *hot)
    _, c, _ = run(capsys, *hot[:-1], "8")
    assert a == b
    assert a.startswith("ROMEO.\n")
    assert a != c


def test_tokenizer_train_writes_a_model_with_the_special_tokens(capsys, small_corpus, tmp_path):
    prefix = tmp_path / "tok" / "shakespeare"
    code, out, _ = run(
        capsys, "tokenizer", "train", str(small_corpus), "--out", str(prefix), "--vocab-size", "384"
    )
    assert code == 0
    model = prefix.with_name("shakespeare.model")
    assert f"wrote {model}" in out
    assert prefix.with_name("shakespeare.vocab").is_file()
    tok = Tokenizer.load(model)
    assert 7 < tok.vocab_size <= 384
    assert [tok.id_to_piece(i) for i in range(7)] == list(SPECIAL_TOKENS)
    text = "Fair is foul, and foul is fair."
    assert tok.decode(tok.encode(text)) == text


def test_data_demo_writes_38_plays(capsys, tmp_path):
    code, out, _ = run(capsys, "data", "demo", str(tmp_path / "plays"))
    assert code == 0
    assert "wrote 38 plays" in out
    plays = sorted((tmp_path / "plays").rglob("*.txt"))
    assert len(plays) == 38
    assert all(p.stat().st_size > 10_000 for p in plays)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train", TINY, "model.d_modle=32"], "did you mean 'model.d_model'?"),
        (["train", TINY, "train.steps"], "'train.steps' is not of the form section.key=value"),
        (["train", TINY, "train.steps=many"], "train.steps='many' should be of type int"),
        (["eval", "/no/such/run"], "'/no/such/run' is neither a run directory"),
        (["sample", "/no/such/run"], "'/no/such/run' is neither a run directory"),
    ],
)
def test_failures_exit_nonzero_with_one_line(capsys, argv, expected):
    code, out, err = run(capsys, *argv)
    assert code != 0
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"flaxlm {argv[0]}: error: ")
    assert expected in lines[0]


def test_eval_of_a_run_without_checkpoints_names_it(capsys, tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    code, _, err = run(capsys, "eval", str(tmp_path / "run"))
    assert code != 0
    assert len(err.strip().splitlines()) == 1
    assert str(tmp_path / "run" / "checkpoints") in err


def test_installed_script(trained_run):
    """The console script itself: exit status 0 and stdout that is exactly one JSON object."""
    script = shutil.which("flaxlm") or str(Path(sys.executable).with_name("flaxlm"))
    proc = subprocess.run(
        [script, "eval", str(trained_run), "--json", "--max-batches", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["step"] == TRAINED_RUN_STEPS
    assert report["perplexity"] == pytest.approx(math.exp(report["val_loss"]), rel=1e-12)


def test_config_show_prints_every_key_and_reads_back_as_the_same_config(tmp_path, capsys):
    from flaxlm.config import load_config, to_dict

    config = REPO / "configs" / "llama_tiny.yaml"
    argv = ["config", "show", str(config), "model.moe.num_experts=4"]
    assert main(argv) == 0
    shown = capsys.readouterr().out
    (tmp_path / "shown.yaml").write_text(shown)
    want = load_config(config, ["model.moe.num_experts=4"], check_paths=False)
    assert to_dict(load_config(tmp_path / "shown.yaml", check_paths=False)) == to_dict(want)
    assert "rope_theta: 10000.0" in shown and "guard:" in shown  # defaults written out
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["moe"]["num_experts"] == 4


def test_every_command_module_is_listed_and_help_starts_without_jax():
    """A module in flaxlm/commands/ adds its parser beside its handler; the entry point lists
    them all, and ``flaxlm --help`` (the parser built in full) imports no jax."""
    from flaxlm import cli

    modules = {p.stem for p in (REPO / "flaxlm" / "commands").glob("*.py")} - {"__init__"}
    assert {m.__name__.rpartition(".")[2] for m in cli.COMMANDS} == modules
    probe = (
        "import sys; from flaxlm.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('jax', 'flax', 'numpy') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_help_of_every_command_exits_zero(capsys):
    for argv in ([], ["data"], ["data", "prepare"], ["convert", "from-hf"], ["generate"]):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--help"])
        assert exc.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: {' '.join(['flaxlm', *argv])} ")
