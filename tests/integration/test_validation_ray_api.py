"""What lipnext_scale.train.validation relies on from Ray Train 2.60's alpha APIs, pinned on real Ray.

One TorchTrainer run (1 worker, no model: the training function only writes and reports three small
checkpoints, pausing between them) with a ValidationConfig built as `validation_config` builds it:
  - `report(..., checkpoint_upload_mode=ASYNC)` returns before the upload; the staging directory is deleted
    once the checkpoint is stored (delete_local_checkpoint_after_upload);
  - the validation function runs in a task of its own while the training function goes on, gets the stored
    checkpoint (`.path` = `{storage}/{name}/{checkpoint_dir_name}`) and `fn_kwargs`;
  - `ray_remote_kwargs` {max_retries, retry_exceptions} retry a validation that raised;
  - `ValidationTaskConfig.timeout_s` cancels a slow one, and the run goes on (it counts from the task's
    launch: process start-up and retries included; here step_2's report sets 5 s, the config 300 s);
  - `fit()` returns only after every queued validation has finished;
  - the dict it returns is merged into that checkpoint's metrics, so `Result.metrics` carries the final
    checkpoint's figures; with no `CheckpointConfig`, Ray deletes no checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _log(log: str, **event) -> None:
    with open(log, "a") as f:
        f.write(json.dumps({"t": time.time(), **event}) + "\n")


def _validate(checkpoint, *, log: str) -> dict:
    name = os.path.basename(checkpoint.path)
    tried = os.path.join(os.path.dirname(log), f"tried-{name}")
    first = not os.path.exists(tried)
    open(tried, "a").close()
    _log(log, ev="start", name=name, path=checkpoint.path, files=sorted(os.listdir(checkpoint.path)))
    if name == "step_1" and first:
        raise RuntimeError("the first attempt fails")
    time.sleep(30 if name == "step_2" else 0.5)  # step_2: far beyond timeout_s
    _log(log, ev="end", name=name)
    return {"val/score": float(name[-1])}


def _train(config) -> None:
    import ray.train
    from ray.train import CheckpointUploadMode, ValidationTaskConfig

    for i in (1, 2, 3):
        staging = tempfile.mkdtemp()
        with open(os.path.join(staging, "w.bin"), "wb") as f:
            f.write(os.urandom(1 << 20))
        t0 = time.time()
        ray.train.report({"step": i}, checkpoint=ray.train.Checkpoint.from_directory(staging),
                         checkpoint_dir_name=f"step_{i}", checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True,
                         validation=ValidationTaskConfig(timeout_s=5) if i == 2 else True)
        _log(config["log"], ev="reported", i=i, seconds=time.time() - t0)
        time.sleep(1.0)
        _log(config["log"], ev="later", i=i, staging_exists=os.path.exists(staging))
        if i == 1:  # keep "training" until the first validation has started (at most a minute)
            deadline = time.time() + 60
            while time.time() < deadline and '"ev": "start"' not in open(config["log"]).read():
                time.sleep(0.2)
    _log(config["log"], ev="train_end")


def test_ray_validation_and_async_upload_behave_as_relied_on(ray_local, tmp_path):
    import sys

    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig, ValidationConfig, ValidationTaskConfig
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's processes cannot import test modules
    log = str(tmp_path / "events.jsonl")
    storage = tmp_path / "storage"
    trainer = TorchTrainer(
        _train, train_loop_config={"log": log}, scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(name="run", storage_path=str(storage)),
        validation_config=ValidationConfig(
            _validate, task_config=ValidationTaskConfig(fn_kwargs={"log": log}, timeout_s=300),
            ray_remote_kwargs={"num_cpus": 0, "max_retries": 1, "retry_exceptions": True}))
    result = trainer.fit()
    fit_returned = time.time()
    events = [json.loads(line) for line in open(log)]

    def times(ev, **match):
        return [e["t"] for e in events if e["ev"] == ev and all(e.get(k) == v for k, v in match.items())]

    reported = [e for e in events if e["ev"] == "reported"]
    assert len(reported) == 3 and all(e["seconds"] < 2.0 for e in reported), reported  # ASYNC: no upload wait
    assert all(not e["staging_exists"] for e in events if e["ev"] == "later")  # deleted after the upload
    starts = [e for e in events if e["ev"] == "start"]
    assert all(e["path"] == f"{storage}/run/{e['name']}" and e["files"] == ["w.bin"] for e in starts)
    assert len(times("start", name="step_1")) == 2 and len(times("end", name="step_1")) == 1  # retried once
    assert times("start", name="step_1")[0] < times("train_end")[0]  # concurrent with training
    assert times("start", name="step_2") and not times("end", name="step_2")  # cancelled at timeout_s
    assert times("end", name="step_3") and times("end", name="step_3")[0] <= fit_returned  # fit waited for it
    assert result.metrics == {"step": 3, "val/score": 3.0}
    by_name = {os.path.basename(c.path): m for c, m in result.best_checkpoints}
    assert by_name == {"step_1": {"step": 1, "val/score": 1.0}, "step_2": {"step": 2},
                       "step_3": {"step": 3, "val/score": 3.0}}
    assert sorted(p.name for p in (storage / "run").glob("step_*")) == ["step_1", "step_2", "step_3"]
