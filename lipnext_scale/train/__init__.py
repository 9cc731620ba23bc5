"""Distributed training: Ray Train + DeepSpeed ZeRO-3 (see `trainer.run_training`).

  preflight.py  every start-time check (config, data and its classes, storage, the start checkpoint)
  trainer.py    TorchTrainer wiring: `run_training(cfg) -> {"metrics", "checkpoint", "run_dir", "certified"}`
  engine.py     model + optimizer + DeepSpeed config -> ZeRO-3 engine and manifold step
  resume.py     load the checkpoint a worker continues from;  loop.py  build, resume, the short loop
  evaluate.py   held-out clean/certified accuracy estimates;  metrics.py  phase timer, loss window
  validation.py Ray Train's side of certification during training (certify/during_training.py)
  loss.py       certified-training losses;  tb.py  TensorBoard scalars under the run's storage
Checkpoints and exports live in `lipnext_scale.ckpt`. Nothing heavy is imported here: `lipnext --help`
and the config checks stay fast.
"""
