"""``flaxlm generate`` / ``sample`` / ``eval`` on a checkpoint made from random parameters
(no training needed: these tests check plumbing, the numerics are tested elsewhere)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from flaxlm.cli import main
from flaxlm.config import Config, ModelConfig
from flaxlm.models import GPT
from flaxlm.tools.evaluate import evaluate
from flaxlm.tools.generate import GenerateOptions, generate
from flaxlm.tools.load import load_checkpoint, save_params_checkpoint


@pytest.fixture(scope="module")
def random_run(small_corpus, tiny_cache_dir, tmp_path_factory):
    from flaxlm.tokenizers.sentencepiece import Tokenizer, train_tokenizer

    tmp = tmp_path_factory.mktemp("random_run")
    tok = Tokenizer.load(train_tokenizer(sorted(small_corpus.iterdir())[:2], tmp / "tok", 384))
    cfg = Config(
        model=ModelConfig(
            vocab_size=384, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64
        )
    )
    cfg.data.paths = [str(small_corpus)]
    cfg.data.cache_dir = str(tiny_cache_dir)
    cfg.data.seq_len = 32
    cfg.data.val_fraction = 0.34
    cfg.data.tokenizer = str(tmp / "tok.model")
    cfg.train.batch_size = 8
    model = GPT(cfg.model)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    save_params_checkpoint(tmp / "run", cfg, params, tok, step=5)
    return tmp / "run"


def test_generate_command_batches_prompts_and_matches_the_api(random_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("HAMLET.\n\nTo be, or not\nO\nKING\n")
    args = [
        "generate",
        str(random_run),
        "--prompts",
        str(prompts),
        "--max-new-tokens",
        "6",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--temperature",
        "0.9",
        "--seed",
        "2",
        "--batch-size",
        "2",
        "--json",
    ]
    assert main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["HAMLET.", "To be, or not", "O", "KING"]
    loaded = load_checkpoint(random_run)
    opts = GenerateOptions(6, temperature=0.9, top_k=20, top_p=0.9, seed=2)
    # Two batches of two (the blank line skipped), each as the API generates it.
    completions = [r["completion"] for r in rows]
    assert generate(loaded, ["HAMLET.", "To be, or not"], opts) == completions[:2]
    assert generate(loaded, ["O", "KING"], opts) == completions[2:]

    assert (
        main(
            [
                "generate",
                str(random_run),
                "--prompt",
                "KING",
                "--num-beams",
                "3",
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    beam_text = capsys.readouterr().out.rstrip("\n")
    assert beam_text == "KING" + generate(loaded, "KING", max_new_tokens=5, num_beams=3)

    assert main(["sample", str(random_run), "--prompt", "KING", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == "KING" + generate(
        loaded, "KING", max_new_tokens=5
    )

    assert main(["generate", str(random_run), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p=0.0" in capsys.readouterr().err


def test_eval_writes_a_json_report_next_to_the_run(random_run, tmp_path, capsys):
    assert main(["eval", str(random_run), "--max-batches", "2", "--batch-size", "4"]) == 0
    printed = capsys.readouterr()
    path = random_run / "evals" / "step_5.val.json"
    report = json.loads(path.read_text())
    assert str(path) in printed.out
    assert "eval" in printed.err  # the progress bar
    assert report["step"] == 5 and report["split"] == "val" and report["batches"] == 2
    assert report["tokens"] == 2 * 4 * 32  # full batches of val text, every target counted
    assert report == pytest.approx(
        {
            **evaluate(random_run, max_batches=2, batch_size=4),
            "seconds": report["seconds"],
            "tokens_per_s": report["tokens_per_s"],
        }
    )

    out = tmp_path / "r.json"
    assert main(["eval", str(random_run), "--max-batches", "1", "--json", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text())
