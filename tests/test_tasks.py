"""Task evaluation (flaxlm/tasks): scores against independent forward passes, the harness's
prompt layout and few-shot draws, KV-cached greedy generation against a step-by-step argmax,
BERT pseudo-log-likelihood, one-line errors, ``flaxlm eval --tasks`` and ``train.eval_tasks``.

The model is a tiny GPT with random weights: agreement needs no trained model.
"""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from flaxlm.cli import main
from flaxlm.config import Config, ModelConfig, load_config
from flaxlm.parallel.sharding import build_mesh
from flaxlm.tasks import Scorer, TaskError, TaskSuite, builtin_tasks, load_task, run_tasks
from flaxlm.tasks.prompts import build_requests
from flaxlm.tasks.scorer import rolling_windows
from flaxlm.tools.load import load_checkpoint, save_params_checkpoint

V = 384


def random_params(model_cfg, seed: int = 0):
    """Random weights plus noise on every leaf (as conftest.noisy_params), in one jitted
    program: eager init compiles op by op, seconds per model on a busy machine."""
    from flax import linen as nn

    from flaxlm.families import build_model

    def make(key):
        params = build_model(model_cfg).init(key, jnp.zeros((1, 8), jnp.int32))["params"]
        leaves, tree = jax.tree.flatten(nn.meta.unbox(params))
        keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
        noisy = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
        return jax.tree.unflatten(tree, noisy)

    return jax.jit(make)(jax.random.key(seed))


@pytest.fixture(scope="module")
def tokenizer(small_corpus, tmp_path_factory):
    from flaxlm.tokenizers.sentencepiece import Tokenizer, train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tok"
    return Tokenizer.load(train_tokenizer(sorted(small_corpus.iterdir())[:2], out, V))


@pytest.fixture(scope="module")
def gpt_run(tokenizer, tmp_path_factory):
    """A tiny GPT (random weights, a 48-token window) saved as a run."""
    model = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=80, max_seq_len=48)
    cfg = Config(model=model)
    cfg.data.seq_len, cfg.train.batch_size = 48, 8
    run = tmp_path_factory.mktemp("tasks") / "run"
    save_params_checkpoint(run, cfg, random_params(model), tokenizer, step=3)
    return run


@pytest.fixture(scope="module")
def loaded(gpt_run):
    return load_checkpoint(gpt_run)


def forward(loaded, tokens: list[int]) -> np.ndarray:
    """Log-probabilities ``(len(tokens), V)`` from one plain forward pass: no segment ids, no
    batching; right-padded to the window so that every call is one compiled program (a causal
    model's positions never see what follows them)."""
    width = loaded.cfg.model.max_seq_len
    fn = loaded.__dict__.setdefault(
        "_ref", jax.jit(lambda p, t: jax.nn.log_softmax(loaded.model.apply({"params": p}, t), -1))
    )
    padded = np.zeros((1, width), np.int32)
    padded[0, : len(tokens)] = tokens
    return np.asarray(fn(loaded.params, jnp.asarray(padded)))[0, : len(tokens)]


def reference_loglikelihood(loaded, ctx: list[int], cont: list[int]) -> float:
    """log p(cont | ctx) from one forward pass of the whole sequence."""
    whole = (ctx + cont)[-(loaded.cfg.model.max_seq_len + 1) :]
    log_p = forward(loaded, whole[:-1])
    n = len(whole) - 1
    return float(log_p[np.arange(n), whole[1:]][n - len(cont) :].sum())


def test_loglikelihoods_equal_unpadded_forward_passes(loaded, tokenizer):
    scorer = Scorer(loaded, batch_size=4)  # 7 pairs: two batches, rows of several buckets
    long = "Tomorrow, and tomorrow, and tomorrow, creeps in this petty pace " * 4
    pairs = [("To be, or not", " to be"), ("Now is the winter ", "of our discontent"),
             (long, " from day to day"), ("", "Alas, poor Yorick"), ("O", " Romeo"),
             ("The king", "'s a bawcock"), ("Friends, Romans", ", countrymen")]  # fmt: skip
    got = scorer.loglikelihood(pairs)
    for (ctx, cont), (ll, greedy) in zip(pairs, got, strict=True):
        c, x = scorer.encode_pair(ctx, cont)
        assert abs(ll - reference_loglikelihood(loaded, c, x)) <= 1e-4, (ctx, cont)
        assert isinstance(greedy, bool)
    # the harness's boundaries: trailing spaces go to the continuation; empty context is <s>
    assert scorer.encode_pair("Now is the winter ", "of") == scorer.encode_pair(
        "Now is the winter", " of"
    )
    assert scorer.encode_pair("", "Alas")[0] == [tokenizer.bos_id]


def test_rolling_windows_predict_every_token_once_within_the_window():
    tokens = list(range(100, 237))
    for max_length in (8, 48, 137, 500):
        windows = rolling_windows(tokens, 1, max_length)
        predicted = [t for _, cont in windows for t in cont]
        assert predicted == tokens
        for ctx, cont in windows:
            assert 1 <= len(ctx) + len(cont) - 1 <= max_length
        assert windows[0][0] == [1]
        for ctx, cont in windows[1:]:  # the context is what precedes the window, contiguous
            start = tokens.index(cont[0])
            assert ctx == tokens[start - len(ctx) : start]


def test_rolling_loglikelihood_sums_the_windows(loaded):
    scorer = Scorer(loaded, batch_size=4)
    text = "If music be the food of love, play on; give me excess of it. " * 3
    tokens = loaded.tokenizer.encode(text)
    windows = rolling_windows(tokens, loaded.tokenizer.bos_id, scorer.max_length)
    assert len(windows) > 1
    expected = sum(reference_loglikelihood(loaded, c, x) for c, x in windows)
    assert abs(scorer.loglikelihood_rolling([text])[0] - expected) <= 1e-3


def test_greedy_generation_equals_a_step_by_step_argmax(loaded):
    scorer = Scorer(loaded, batch_size=2)
    prompts = ["Good night, sweet prince", "Is this a dagger", "Out"]
    texts = scorer.generate_until([(p, [], 6) for p in prompts])
    tok = loaded.tokenizer
    for prompt, text in zip(prompts, texts, strict=True):
        ids = tok.encode(prompt)
        out = []
        for _ in range(6):  # no cache: the whole sequence again for every token
            nxt = int(np.argmax(forward(loaded, ids + out)[-1]))
            if nxt == tok.eos_id:
                break
            out.append(nxt)
        assert text == tok.decode(out)
    stop = texts[0][2:4] if len(texts[0]) > 4 else None
    if stop:  # the text is cut at the first stop string, which it does not keep
        cut = scorer.generate_until([(prompts[0], [stop], 6)])[0]
        assert cut == texts[0].split(stop)[0]


def write_task(folder, name="mini", **extra) -> None:
    docs = [{"q": f"Who speaks line {i}?", "choices": ["Hamlet", "Ophelia", "Lear"], "a": i % 3}
            for i in range(6)]  # fmt: skip
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    config = {"task": name, "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": "docs.jsonl"}}, "test_split": "test",
              "fewshot_split": "test", "output_type": "multiple_choice",
              "doc_to_text": "Q: {{q}}\nA:", "doc_to_choice": "choices", "doc_to_target": "a",
              **extra}  # fmt: skip
    (folder / f"{name}.yaml").write_text(json.dumps(config))  # JSON is YAML


def test_fewshot_prompts_follow_the_harness_layout_and_seeded_draw(tmp_path):
    write_task(tmp_path)
    spec = load_task("mini", [tmp_path])
    requests = build_requests(spec, num_fewshot=2)
    assert requests == build_requests(spec, num_fewshot=2)  # deterministic
    rnd = random.Random(1234)  # the harness's fewshot seed, one generator for the task
    for i, doc in enumerate(spec.docs):
        shots = [d for d in rnd.sample(spec.docs, 3) if d != doc][:2]  # never the doc itself
        ctx = "".join(f"Q: {s['q']}\nA: {s['choices'][s['a']]}\n\n" for s in shots)
        mine = [r for r in requests if r.doc == i]
        assert [r.context for r in mine] == [ctx + f"Q: {doc['q']}\nA:"] * 3
        assert [r.continuation for r in mine] == [" Hamlet", " Ophelia", " Lear"]


def test_shipped_tasks_load_with_their_data():
    assert set(builtin_tasks()) >= {"shakespeare_next_line", "shakespeare_cloze",
                                    "shakespeare_next_word", "shakespeare_passages"}  # fmt: skip
    for name in builtin_tasks():
        spec = load_task(name)
        assert len(spec.docs) >= 50
        assert build_requests(spec, num_fewshot=1, limit=2)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dataset_kwargs": {"data_files": {"test": "gone.jsonl"}}}, "data file 'gone.jsonl'"),
        ({"dataset_path": "hellaswag"}, "dataset_path='hellaswag'"),
        ({"output_type": "ranking"}, "output_type='ranking'"),
        ({"filter_list": []}, "key 'filter_list' is not supported"),
        ({"metric_list": [{"metric": "bleu"}]}, "metric 'bleu'"),
        ({"doc_to_text": "{{missing}}"}, "doc_to_text"),
    ],
)
def test_a_bad_task_is_one_line_naming_the_value(tmp_path, change, message):
    write_task(tmp_path, **change)
    with pytest.raises(TaskError, match=message) as info:
        TaskSuite.load(["mini"], [tmp_path], num_fewshot=0)
    assert "\n" not in str(info.value)


def test_unknown_task_and_bad_yaml_are_one_line(tmp_path):
    with pytest.raises(TaskError, match="'nope' is not a shipped task"):
        load_task("nope")
    (tmp_path / "bad.yaml").write_text("task: [unclosed\n")
    with pytest.raises(TaskError, match="not valid YAML"):
        load_task(tmp_path / "bad.yaml")
    (tmp_path / "fn.yaml").write_text("task: fn\ndoc_to_text: !function utils.f\n")
    with pytest.raises(TaskError, match="!function"):
        load_task(tmp_path / "fn.yaml")


def test_bert_scores_multiple_choice_by_pseudo_log_likelihood(tokenizer):
    from flaxlm.families import build_model

    small = ["model.d_model=32", "model.n_layers=1", "model.d_ff=64", "model.max_seq_len=32"]
    cfg = load_config(REPO / "configs" / "bert_tiny.yaml", [f"model.vocab_size={V}", *small])
    mesh = build_mesh(cfg.mesh)
    bert = SimpleNamespace(cfg=cfg, model=build_model(cfg.model), params=random_params(cfg.model),
                           tokenizer=tokenizer, mesh=mesh, step=0)  # fmt: skip
    scorer = Scorer(bert, batch_size=4)
    ctx, cont = scorer.encode_pair("My lord, I have remembrances", " of yours")
    ((ll, _),) = scorer.loglikelihood([("My lord, I have remembrances", " of yours")])
    model, tok = build_model(cfg.model), tokenizer
    row = [tok.cls_id, *ctx, *cont, tok.sep_id]
    everywhere = jax.jit(  # MLM logits at every position of one row
        lambda p, t: model.apply({"params": p}, t, masked_positions_BxP=jnp.arange(len(row))[None],
                                 with_nsp=False)["mlm_logits"][0]
    )  # fmt: skip
    expected = 0.0
    for j, target in enumerate(cont):  # mask one continuation token at a time
        masked = list(row)
        masked[1 + len(ctx) + j] = tok.mask_id
        logits = everywhere(bert.params, jnp.asarray([masked]))
        expected += float(jax.nn.log_softmax(logits[1 + len(ctx) + j])[target])
    assert abs(ll - expected) <= 1e-4
    with pytest.raises(TaskError, match="model.family='bert' scores only loglikelihood"):
        TaskSuite.load(["shakespeare_next_word"]).check(scorer)


def test_eval_tasks_command_prints_the_table_and_json_the_same_numbers(gpt_run, capsys):
    argv = ["eval", str(gpt_run), "--tasks", "shakespeare_cloze", "--num-fewshot", "2",
            "--limit", "5", "--batch-size", "8"]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    metrics = report["tasks"]["shakespeare_cloze"]
    assert metrics["docs"] == 5 and metrics["num_fewshot"] == 2
    assert f"{metrics['acc']:.4f}" in table and f"{metrics['acc_norm']:.4f}" in table
    saved = sorted((gpt_run / "evals").glob("step_3.tasks-*.json"))
    assert json.loads(saved[-1].read_text())["tasks"] == report["tasks"]
    # acc is the share of documents whose best-scored choice is the label
    again = run_tasks(load_checkpoint(gpt_run), ["shakespeare_cloze"], 2, 5, 8, samples=True)
    samples = again["tasks"]["shakespeare_cloze"]["samples"]
    docs = load_task("shakespeare_cloze").docs
    hits = [
        int(np.argmax([s["result"][0] for s in samples if s["doc"] == d])) == docs[d]["label"]
        for d in range(5)
    ]
    assert metrics["acc"] == pytest.approx(np.mean(hits))
    assert main(["eval", str(gpt_run), "--tasks", "nope"]) == 2
    assert "not a shipped task" in capsys.readouterr().err


@pytest.mark.slow  # a (two-step) training run: ~30-40 s on 2 busy cores
def test_training_logs_task_metrics_beside_val_loss(small_corpus, tiny_cache_dir, tmp_path):
    from conftest import tiny_config

    from flaxlm.train import train

    write_task(tmp_path)
    yaml_path = str(tmp_path / "mini.yaml")
    run = tmp_path / "run"
    cfg = tiny_config(small_corpus, tiny_cache_dir, run, "train.steps=2", "train.eval_every=1",
                      f"train.eval_tasks=[{yaml_path}]", "train.eval_tasks_every=2",
                      "train.progress=false")  # fmt: skip
    train(cfg)
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "val_loss" in r]  # fmt: skip
    assert [("tasks/mini/acc" in r) for r in evals] == [False, True]  # every 2 steps
    assert 0.0 <= evals[-1]["tasks/mini/acc"] <= 1.0
    bad = tiny_config(small_corpus, tiny_cache_dir, tmp_path / "bad", "train.eval_tasks=[nope]")
    with pytest.raises(ValueError, match="train.eval_tasks: task 'nope'"):
        train(bad)
    logged = (tmp_path / "bad" / "metrics.jsonl").read_text()
    assert '"loss"' not in logged  # refused before step 1
