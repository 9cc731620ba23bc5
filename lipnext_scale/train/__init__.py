"""Distributed training: Ray Train + DeepSpeed ZeRO-3 (see `trainer.run_training`).

  trainer.py     start-time checks, TorchTrainer wiring: `run_training(cfg) -> {"metrics", "checkpoint", "run_dir"}`
  loop.py        one worker's loop (plain torch.distributed + DeepSpeed; Ray is handed in as callbacks)
  checkpoint.py  checkpoint format, manifest/sha256 validation, newest-valid discovery, consolidation
  zero_state.py  engine <-> checkpoint tensors (fp32 masters, optimizer state, re-partitioning)
  loss.py        margin-aware cross-entropy;  metrics.py  DeepSpeed config, phase timer, bounds
  tb.py          TensorBoard scalars under the run's storage;  export.py  the exported-model format
Nothing heavy is imported here: `lipnext --help` and the config checks stay fast.
"""
