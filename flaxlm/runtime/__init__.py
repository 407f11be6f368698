"""The process around the model: which accelerator is present (accelerators.py), joining a
multi-host job (distributed.py), host memory (host_memory.py), process liveness (pids.py)."""
