"""The entry layer (issue 24): one error base class mapped to an exit code in one place, and the console
filter of `runtime.quiet_console`."""

from __future__ import annotations

import argparse
import logging
import os
import re

import pytest

from lipnext_scale.cli import run_command
from lipnext_scale.errors import LipnextError, RunFailed


def _raising(error: Exception):
    def run(args: argparse.Namespace) -> int:
        raise error
    return run


def test_a_lipnext_error_is_one_line_and_its_exit_code(capsys):
    assert run_command("lipnext x", _raising(LipnextError("--flag 3: must be >= 4")), argparse.Namespace()) == 2
    assert capsys.readouterr().err == "lipnext x: error: --flag 3: must be >= 4\n"
    assert run_command("lipnext x", _raising(RunFailed("nothing was certified")), argparse.Namespace()) == 1
    assert capsys.readouterr().err == "lipnext x: error: nothing was certified\n"
    assert run_command("lipnext x", lambda args: None, argparse.Namespace()) == 0


def test_other_exceptions_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        run_command("lipnext x", _raising(ZeroDivisionError("a bug")), argparse.Namespace())


def test_user_facing_errors_share_the_base_and_keep_their_old_one():
    from lipnext_scale.certify.model_loading import CertifyError, CertifyRefused
    from lipnext_scale.ckpt.export import ExportError
    from lipnext_scale.ckpt.format import CheckpointError
    from lipnext_scale.config import ConfigError
    from lipnext_scale.data.errors import DataError
    from lipnext_scale.eps import CertifyInputError
    from lipnext_scale.serve.cli import ServeArgumentError
    from lipnext_scale.storage import StorageError
    from lipnext_scale.train.trainer import TrainingDiverged

    for cls, old in ((ConfigError, ValueError), (StorageError, ValueError), (CheckpointError, ValueError),
                     (ExportError, ValueError), (DataError, ValueError), (CertifyInputError, ValueError),
                     (ServeArgumentError, ValueError), (CertifyError, RuntimeError), (CertifyRefused, RuntimeError),
                     (TrainingDiverged, RuntimeError)):
        assert issubclass(cls, LipnextError) and issubclass(cls, old), cls
    assert TrainingDiverged.exit_code == 1 and ConfigError.exit_code == 2


def test_quiet_console_skips_the_noise_and_keeps_our_lines(monkeypatch):
    from lipnext_scale import runtime

    monkeypatch.delenv("RAY_DEDUP_LOGS_SKIP_REGEX", raising=False)
    runtime.quiet_console()
    skip = re.compile(os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"])
    noise = ["[2026-12-02 12:53:44,260 E 2908 2943] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
             "and ID: 'ab1c' has constructor arguments in the object store and max_restarts > 0. If the arguments",
             "[2026-12-02 12:54:32,914] [WARNING] [engine.py:2304:_do_optimizer_sanity_check] **** You are using ZeRO "
             "with an untested optimizer, proceed with caution *****",
             "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"]
    ours = ["world size 2 (train.num_workers 2): global batch 64 = 2 ranks x micro-batch 32 x 1 accumulation steps",
            "WARNING lipnext_scale.train.loop: checkpoint at step 4 took 12 s: raise ckpt.every_steps",
            "train e2e: 100%|##########| 4/4 [00:01<00:00,  3.13it/s]"]
    assert all(skip.search(line) for line in noise)
    assert not any(skip.search(line) for line in ours)

    notice = logging.getLogger(runtime.TOKEN_AUTH_NOTICE[0])
    record = notice.makeRecord(notice.name, logging.WARNING, __file__, 1, "Token authentication is enabled for "
                               "this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.", (), None)
    assert not notice.filter(record)
    record.msg = "Token authentication is disabled for this Ray cluster."  # a warning that asks for action
    assert notice.filter(record)
    runtime.quiet_console()
    assert len(notice.filters) == 1  # once, however many commands a process runs
