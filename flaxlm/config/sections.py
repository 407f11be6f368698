"""Typed, nested run configuration.

Defaults live in the dataclasses below; a YAML file holds only what differs, and the command
line overrides single keys as ``section.key=value``. The allowed values of string keys are
declared once, in :data:`CHOICES` below the dataclasses. Everything is validated once, in
:func:`load_config` (setting keys and ConfigError: checks.py; the value checks: validation.py);
nothing below this layer reads YAML or argv.

These are the core sections. A family's own section (BERT's ``objective``) is not named here:
its entry registers it (registry.py), and :class:`Config` and :class:`ModelConfig` hold the
registered sections as attributes (``cfg.objective.mlm``).

    cfg = load_config("configs/gpt_demo.yaml", ["train.steps=100", "optim.lr=1e-3"])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flaxlm.config.checks import ConfigError, parse_yaml, set_key
from flaxlm.config.registry import SectionHost, section_items
from flaxlm.config.validation import validate


@dataclass(unsafe_hash=True)  # hashable, as ModelConfig which holds it
class MoEConfig:
    """Mixture-of-Experts FFN (flaxlm/models/moe.py); ``num_experts: 0`` = dense MLPs."""

    num_experts: int = 0
    top_k: int = 2  # experts per token
    capacity_factor: float = 0.0  # 0 = dropless (grouped matmuls); c > 0: c * T * k / E each
    # expert parallelism: 0 = receive buffers for the worst case (dropless); f > 0: f x the
    # device's own pairs, the overflow dropped and counted (MaxText's ragged_buffer_factor)
    buffer_factor: float = 0.0
    every: int = 1  # MoE in every n-th block (the others dense); 1 = all
    router_z_loss: float = 1.0e-3  # weight of mean(logsumexp(router logits)^2)
    load_balance_loss: float = 1.0e-2  # weight of E * sum_e f_e * P_e
    shared_experts: int = 0  # always-on experts beside the routed ones (DeepSeek-MoE)
    d_expert: int = 0  # hidden width of each expert (fine-grained experts); 0 = model.d_ff
    # softmax: Mixtral's router. sigmoid: DeepSeek-V3's: sigmoid scores, top-k chosen on scores
    # + a per-expert bias that gets no gradient; the train step moves it by bias_update_rate
    # toward balance (+ for underloaded experts, - for overloaded) from each step's load.
    router: str = "softmax"
    bias_update_rate: float = 1.0e-3


@dataclass(unsafe_hash=True)  # hashable: modules holding it can be static jit arguments
class ModelConfig(SectionHost, path="model"):
    # An entry of the family table (flaxlm/families/): gpt (causal decoder), bert (encoder:
    # MLM / NSP / unified objective), or one registered with register_family
    family: str = "gpt"
    vocab_size: int = 8192
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 6
    # Key/value heads: 0 = n_heads (multi-head attention); 1 = multi-query; a divisor of
    # n_heads = grouped-query attention (GQA), each key/value head shared by n_heads / n_kv_heads
    # query heads (attention, the KV cache and every kernel)
    n_kv_heads: int = 0
    d_ff: int = 1536
    max_seq_len: int = 1024  # size of the learned / sinusoidal position table
    positions: str = "learned"  # a learned or sinusoidal table (max_seq_len), or rope
    rope_theta: float = 10000.0
    # gelu: tanh approximation, as GPT-2; gelu_exact: erf; relu; swiglu: a gated MLP,
    # silu(x W_gate) * (x W_up) W_down (Llama), three d_model x d_ff matrices
    activation: str = "gelu"
    norm: str = "layernorm"  # or rmsnorm (Llama: scale only, no mean, no bias)
    tie_embeddings: bool = True
    use_bias: bool = True
    dropout: float = 0.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype; matmuls accumulate in float32
    param_dtype: str = "float32"
    # Scan over layers (nn.scan): one compiled block, so compile time stays flat with depth;
    # parameters get a leading "layers" axis.
    scan_layers: bool = False
    # activation recomputation per block (dots: keep matmul outputs; save_* / offload_*: keep
    # named projection outputs on the device / in host memory: flaxlm/models/layer_stack.py)
    remat: str = "none"
    # auto = by the platform the step is compiled for: splash on TPU, triton on GPU (cudnn,
    # then xla, where it cannot tile the shape), flaxlm on CPU (flaxlm/models/attention.py).
    # flaxlm: softmax attention with a closed-form backward; xla / cudnn:
    # jax.nn.dot_product_attention (cudnn needs a GPU and bf16 / fp16 compute; segments become
    # a dense mask); splash / triton: the Pallas TPU splash / GPU flash kernels (segment ids
    # compared inside the kernel, no dense mask)
    attention_impl: str = "auto"
    # GPT (flaxlm attention): queries in blocks of this many positions, each attending only to
    # the keys up to its end, so the masked upper triangle is not computed; 0, or a length it
    # does not divide, = one block
    causal_block: int = 64
    # The hand-written backward passes (matmul, attention, LayerNorm, GELU, chunked head +
    # loss; flaxlm/models/backward.py): auto = on only on the CPU, where they are faster;
    # off = plain autodiff of the same forward; on = everywhere
    custom_backward: str = "auto"
    # BERT only (GPT is always pre-LN): post = original BERT, pre = LN inside the residual branch
    norm_placement: str = "pre"
    type_vocab_size: int = 2  # BERT segment (token type) embeddings: A / B
    moe: MoEConfig = field(default_factory=MoEConfig)
    # The sections registered under model (model.<name>), as (name, value) pairs; read them as
    # attributes (registry.py)
    extra_sections: tuple[tuple[str, Any], ...] = ()


@dataclass
class SourceConfig:
    """One source of a mixture (``data.sources``); see flaxlm/data/sources.py for the kinds."""

    path: str = ""  # a file, a folder, a saved HF dataset folder, or tfds:NAME[/CONFIG][:VERSION]
    weight: float = 1.0  # share of training rows, after normalising over the sources
    name: str = ""  # for logs and per-source losses; default: derived from the path
    field: str = ""  # text field / column; default: data.jsonl_field
    split: str = "train"  # which split of a TFDS / HF dataset to read


@dataclass
class StageConfig:
    """A mixture stage (``data.stages``): from data position ``step`` on (after ``step`` steps
    of a run without rollbacks), the sources are drawn by these weights (by source name;
    a source left out gets none). flaxlm/data/mixture.py."""

    step: int = 0
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # text files, directories, .jsonl files
    jsonl_field: str = "text"
    # A weighted mixture instead of ``paths``: [{path: ..., weight: ..., field: ...}, ...]
    sources: list[SourceConfig] = field(default_factory=list)
    # Mixture stages, e.g. annealing: [{step: 800, weights: {books: 0.7, web: 0.3}}]; the
    # sources' own weights hold before the first stage
    stages: list[StageConfig] = field(default_factory=list)
    tfds_data_dir: str = (
        ""  # where prepared TFDS datasets live; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
    )
    seq_len: int = 256
    val_fraction: float = 0.1  # fraction of documents held out, chosen by a hash of the doc
    # How each document (a text file, a JSONL / dataset row) is cut into documents: none (as
    # is), blank_lines (paragraphs), lines (one per line), or chars:N (pieces of N characters,
    # ended at a newline or space where there is one): one big .txt becomes a corpus
    doc_split: str = "none"
    cache_dir: str = ".cache/flaxlm"
    # A corpus written by `flaxlm data prepare` (sharded, memory-mapped, with a manifest):
    # training reads it instead of the raw sources (paths are then not read; the names and
    # weights of data.sources still apply). Empty = the tokenize-once cache of the sources.
    prepared: str = ""
    # An existing tokenizer: a sentencepiece .model, a HuggingFace tokenizer.json, or an HF
    # tokenizer directory (tokenizer.json, or vocab.txt / vocab.json + merges.txt); special
    # roles come from its tokenizer_config.json or usual names. Empty = train one on the train
    # split. Checkpoints and the cache keep its bytes, so eval/generate/resume reload it exactly.
    tokenizer: str = ""
    tokenizer_type: str = "bpe"  # only when training one: bpe/unigram (sentencepiece), byte_bpe
    tokenizer_vocab_size: int = 8192
    byte_fallback: bool = True
    tokenizer_character_coverage: float = 1.0  # share of characters kept as pieces (CJK: 0.9995)
    tokenizer_normalization: str = "identity"  # identity = exact round trip; the others: lossy
    # Special tokens a given tokenizer lacks: role -> piece, e.g. {pad: "</s>", mask: "[MASK]"};
    # a piece not in its vocabulary is appended as a new control piece (HF: special token).
    tokenizer_specials: dict[str, str] = field(default_factory=dict)


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate
    schedule: str = "cosine"  # the shape of each: flaxlm/train/optim.py
    warmup_steps: int = 100
    decay_steps: int = 0  # 0 = train.steps
    min_lr_ratio: float = 0.1  # the floor of cosine / linear decay, as a fraction of the peak
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # 0 = no clipping
    # What warmup_steps / decay_steps count: optimizer steps, or tokens in units of full
    # batches (train.batch_size x seq_len; differs from steps only under train.batch_ramp)
    schedule_unit: str = "steps"


@dataclass
class DistributedConfig:
    """Multi-host runs on JAX's own runtime (``jax.distributed.initialize``).

    ``auto`` lets JAX detect the cluster (TPU pods, SLURM, ...); otherwise set the coordinator
    address and the process count / id here or through the launcher's environment
    (FLAXLM_COORDINATOR, FLAXLM_NUM_PROCESSES, FLAXLM_PROCESS_ID). One process = no-op.
    """

    auto: bool = False
    coordinator_address: str = ""  # host:port of process 0
    num_processes: int = 1
    process_id: int = 0
    local_device_count: int = 0  # CPU only: simulated devices per process (0 = JAX default)
    initialization_timeout: int = 300  # seconds to wait for every process to join
    heartbeat_timeout: int = 100  # seconds without a heartbeat before a peer counts as dead


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global sequences per step (all devices, all micro-batches)
    grad_accum: int = 1
    # Batch-size ramp-up: [[data position, batch size], ...] from position 0, ending at
    # batch_size, e.g. [[0, 8], [200, 16], [400, 32]] (flaxlm/data/batch_ramp.py); [] = no ramp
    batch_ramp: list[list[int]] = field(default_factory=list)
    seed: int = 0
    run_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 16  # 0 = the whole validation split
    # Benchmark tasks run during training (flaxlm/tasks, docs/tasks.md): shipped task names or
    # task YAML files; their metrics are logged as tasks/<task>/<metric> beside val_loss. They
    # run every eval_tasks_every steps (0: at every evaluation; a multiple of eval_every).
    eval_tasks: list[str] = field(default_factory=list)
    eval_tasks_every: int = 0
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    # GPT: > 0 runs the LM head and loss over chunks of this many positions
    # (flaxlm/losses/head_loss.py), so the B x L x V logits are never stored whole: a memory saver
    # for large vocabularies (not faster on CPU); 0 = the plain logits path
    head_chunk: int = 0
    progress: bool = True
    # Hang watchdog: a step (or eval / checkpoint phase) running longer than
    # max(watchdog_factor x the recent median step, watchdog_min_s) stops the process with a
    # message naming the step and phase, so the scheduler restarts it from a checkpoint.
    watchdog_factor: float = 50.0  # 0 = watchdog off
    watchdog_min_s: float = 600.0
    # [start, stop]: a jax.profiler trace of steps start..stop into RUN_DIR/profile/
    # (TensorBoard's profile plugin / XProf read it; docs/profiling.md); [] = no trace.
    profile_steps: list[int] = field(default_factory=list)
    profile_hosts: list[int] = field(default_factory=list)  # processes that trace; [] = all
    # Resuming with a changed key that changes what the run computes (model, tokenizer, data
    # and its content, seed, batch size, optimizer, ...; flaxlm/train/resume_checks.py) is
    # refused unless this is true; the accepted change is then an event in metrics.jsonl.
    allow_config_change: bool = False
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


@dataclass
class MeshConfig:
    data: int = -1  # one axis may be -1: it takes the devices the others leave
    fsdp: int = 1
    expert: int = 1  # expert parallelism (MoE experts split over it; the batch too)
    context: int = 1  # context parallelism: the sequence split over it (not the rows)
    tensor: int = 1
    # Multi-slice TPU (or multi-node GPU) jobs: how many slices the data / fsdp axis spans.
    # Each is the outer factor of its axis (it must divide it): devices that differ only in
    # it sit in different slices, so only that axis's collectives cross the data-center
    # network (DCN); the inner factor and tensor stay on a slice's fast links (ICI).
    dcn_data: int = 1
    dcn_fsdp: int = 1


@dataclass
class CheckpointConfig:
    every: int = 500  # steps between saves to the run dir (train.run_dir: a folder or a bucket)
    keep: int = 3
    asynchronous: bool = True
    # A fast tier on node-local disk (docs/storage.md): every local_every steps a checkpoint
    # goes to local_dir only; every `every` steps it also goes to the run dir. A restart takes
    # the newest intact step of either. "" / 0 = off.
    local_dir: str = ""
    local_every: int = 0


@dataclass
class GuardConfig:
    """Spike / NaN detection and automatic rollback (see flaxlm/train/guard_rules.py)."""

    enabled: bool = True
    window: int = 128  # healthy steps in the rolling statistics
    warmup: int = 20  # healthy steps needed before the outlier test starts (NaN: always)
    # A step is bad when its loss > median + k_sigma x scale of the window, with the robust
    # scale = max(1.4826 x MAD, rel_floor x |median|): the median absolute deviation is the
    # std of Gaussian noise but ignores the window's outliers, and the floor keeps a quiet
    # window (or a short one) from making ordinary noise look like a spike.
    k_sigma: float = 6.0
    rel_floor: float = 0.02
    # The same test on the gradient norm, with its own k; 0 = only non-finite norms are bad.
    # Off by default: with clipping, a norm outlier alone cannot move the weights further
    # than a normal step, and small models show harmless 10-sigma norm outliers.
    grad_norm_k_sigma: float = 0.0
    max_ratio: float = 0.0  # also bad when value > max_ratio x rolling median; 0 = off
    known_good_after: int = 20  # healthy steps after a checkpoint that make it known good
    margin: int = 0  # extra data positions skipped after the bad one
    max_rollbacks: int = 5  # per run
    max_per_window: int = 2  # rollbacks to the same checkpoint
    cooldown_steps: int = 0  # after a rollback, scale the LR by cooldown_factor for this long
    cooldown_factor: float = 0.1


@dataclass
class ChaosConfig:
    """Fault injection for tests and demos. A fault is attached to the batch that step s
    trains on in an undisturbed run (data position s - 1), so after a rollback it is skipped
    with its batch, as a real bad batch would be."""

    spike_at_steps: list[int] = field(default_factory=list)  # LR x spike_lr_scale there
    spike_lr_scale: float = 1000.0
    nan_at_steps: list[int] = field(default_factory=list)  # the step starts from NaN params
    hang_at_steps: list[int] = field(default_factory=list)  # the host stalls there (watchdog)


@dataclass
class LoggingConfig:
    """Where metrics go besides metrics.jsonl and TensorBoard (flaxlm/train/wandb_log.py)."""

    # Weights & Biases (pip install 'flaxlm[wandb]'): every metrics.jsonl record also goes to
    # one W&B run, continued by a resume of the same run dir (its id is in RUN_DIR/wandb.json)
    wandb: bool = False
    wandb_project: str = "flaxlm"
    wandb_entity: str = ""  # "" = your default entity
    wandb_name: str = ""  # "" = the run dir's name
    # offline: written under RUN_DIR/wandb, uploaded later with `wandb sync`; training never
    # waits for the network or a login. online: streamed as it trains. $WANDB_MODE wins if set.
    wandb_mode: str = "offline"
    wandb_tags: list[str] = field(default_factory=list)


@dataclass
class Config(SectionHost, path=""):
    """The run's config: the core sections, plus the registered ones (a family's, such as
    BERT's ``objective``) as attributes after them."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    chaos: ChaosConfig = field(default_factory=ChaosConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    extra_sections: tuple[tuple[str, Any], ...] = ()  # registered sections (registry.py)


# The allowed values of every core string key, declared only here: validation, the CLI's
# choices and the tokenizer read them from this table, and so should any new code. A
# registered section declares its own (ConfigSection.choices).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.norm_placement": ("pre", "post"),
    "model.positions": ("learned", "sinusoidal", "rope"),
    "model.activation": ("gelu", "gelu_exact", "relu", "swiglu"),
    "model.moe.router": ("softmax", "sigmoid"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": (
        "none",
        "full",
        "dots",
        "save_qkv_proj",
        "save_attention",
        "save_all_proj",
        "offload_qkv_proj",
        "offload_all_proj",
    ),
    "model.attention_impl": ("auto", "flaxlm", "xla", "cudnn", "splash", "triton"),
    "model.custom_backward": ("auto", "on", "off"),
    "data.tokenizer_type": ("bpe", "unigram", "byte_bpe"),
    "data.tokenizer_normalization": ("identity", "nfkc", "nmt_nfkc", "nfkc_cf"),
    "optim.schedule": ("cosine", "linear", "constant", "noam"),
    "optim.schedule_unit": ("steps", "tokens"),
    "logging.wandb_mode": ("offline", "online"),
}


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain nested dicts (what ``config.yaml`` in a run dir holds), the
    registered sections included, each after its host's own keys."""
    return _plain(cfg)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {name: _plain(v) for name, v in section_items(value)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def from_dict(raw: dict[str, Any], check_paths: bool = True) -> Config:
    """Builds and validates a Config from nested dicts; unknown keys and bad types raise.

    ``check_paths=False`` is for configs read back from a checkpoint, whose data may live on
    another machine.
    """
    cfg = Config()
    for section, values in (raw or {}).items():
        set_key(cfg, section, values, allow_section=True)
    validate(cfg, CHOICES, check_paths=check_paths)
    return cfg


def load_config(
    path: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    check_paths: bool = True,
) -> Config:
    """Reads a YAML config, applies ``key.sub=value`` overrides, validates, returns it.

    ``check_paths=False`` skips the data-path checks, for commands that never read the data
    (``flaxlm plan`` compiles on abstract inputs).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        raw = parse_yaml(path.read_text(), f"config file {str(path)!r}") or {}
        if not isinstance(raw, dict):
            raise ConfigError(
                f"config file {str(path)!r} must hold a mapping, got {type(raw).__name__}"
            )
    cfg = Config()
    for section, values in raw.items():
        set_key(cfg, section, values, allow_section=True)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        value = parse_yaml(text, f"override {item!r}") if text.strip() else ""
        set_key(cfg, key.strip(), value)
    validate(cfg, CHOICES, check_paths=check_paths)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Writes the resolved config as YAML (atomically: a failure leaves any old file intact)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
