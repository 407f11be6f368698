"""Joining a multi-host run through JAX's own runtime, ``jax.distributed``.

Call :func:`initialize` once per process, before anything touches a JAX backend. Settings come
from ``train.distributed`` in the config, overridden by the environment a launcher sets
(``launch/local.sh``, ``launch/slurm.sbatch``, ``launch/tpu_pod.sh``, ``launch/k8s/``):

    FLAXLM_COORDINATOR=host:port  FLAXLM_NUM_PROCESSES=N  FLAXLM_PROCESS_ID=i
    FLAXLM_LOCAL_DEVICES=k        (CPU only: simulated devices per process)
    FLAXLM_DISTRIBUTED_AUTO=1     (let JAX detect the cluster: TPU pods, SLURM, ...)
"""

from __future__ import annotations

import dataclasses
import os

from flaxlm.config import ConfigError, DistributedConfig


def from_environment(cfg: DistributedConfig) -> DistributedConfig:
    """The config with any FLAXLM_* launcher variables applied on top."""
    env = os.environ
    updates: dict = {}
    if env.get("FLAXLM_COORDINATOR"):
        updates["coordinator_address"] = env["FLAXLM_COORDINATOR"]
    for var, name in (
        ("FLAXLM_NUM_PROCESSES", "num_processes"),
        ("FLAXLM_PROCESS_ID", "process_id"),
        ("FLAXLM_LOCAL_DEVICES", "local_device_count"),
    ):
        if env.get(var):
            try:
                updates[name] = int(env[var])
            except ValueError:
                raise ConfigError(f"{var}={env[var]!r} should be an integer") from None
    if env.get("FLAXLM_DISTRIBUTED_AUTO") in ("1", "true", "yes"):
        updates["auto"] = True
    return dataclasses.replace(cfg, **updates)


def initialize(cfg: DistributedConfig) -> DistributedConfig:
    """Starts ``jax.distributed`` when the run spans several processes; returns the settings
    used. A single process only applies ``local_device_count``."""
    import jax

    cfg = from_environment(cfg)
    if cfg.local_device_count:
        jax.config.update("jax_num_cpu_devices", cfg.local_device_count)
    if cfg.auto:
        jax.distributed.initialize()
        return cfg
    if cfg.num_processes <= 1:
        return cfg
    if not 0 <= cfg.process_id < cfg.num_processes:
        raise ConfigError(
            f"train.distributed.process_id={cfg.process_id} must be in "
            f"[0, num_processes={cfg.num_processes})"
        )
    if not cfg.coordinator_address or ":" not in cfg.coordinator_address:
        raise ConfigError(
            f"train.distributed.coordinator_address={cfg.coordinator_address!r} should be "
            "host:port of process 0"
        )
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address,
        num_processes=cfg.num_processes,
        process_id=cfg.process_id,
        initialization_timeout=cfg.initialization_timeout,
        heartbeat_timeout_seconds=cfg.heartbeat_timeout,
    )
    return cfg
