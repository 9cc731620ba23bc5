"""One label check on every data path (issue 25): a label outside the model's classes never reaches the loss.

Loose shards (no manifest, no classes.json), brace patterns and globs have nothing the job-start check can
read the labels from, so the streams check each label against model.num_classes: a bad one is a counted skip
logged with its shard and key. Certification refuses the same label with one line. Real shards, the real
loaders and the real training loss."""

import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fixtures_data as fx  # noqa: E402

from lipnext_scale.config import DataConfig, LossConfig  # noqa: E402
from lipnext_scale.data.shards import iter_shard_samples, make_eval_loader, make_train_loader  # noqa: E402
from lipnext_scale.data.tar_reader import SkipStats, label_problem  # noqa: E402
from lipnext_scale.train.loss import certified_loss  # noqa: E402

NUM_CLASSES = 10


def _loose_shards(folder: Path) -> list[Path]:
    """Two hand-made shards (no manifest, no classes.json): labels 0..9, and in the second one sample labelled
    10 (`bad-000`) and one labelled -1 (`bad-001`)."""
    def members(prefix: str, labels: list[int]) -> list[tuple[str, bytes]]:
        out = []
        for i, label in enumerate(labels):
            out += [(f"{prefix}-{i:03d}.png", fx.png_bytes(fx.class_color(max(label, 0) % 10), size=(32, 32))),
                    (f"{prefix}-{i:03d}.cls", str(label).encode())]
        return out

    return [fx.write_tar(folder / "train-000000.tar", members("good", list(range(10)))),
            fx.write_tar(folder / "train-000001.tar", members("bad", [10, -1] + list(range(6))))]


@pytest.mark.parametrize("label,problem", [
    (0, None), (9, None), (10, "label 10 is outside the model's 10 classes (0..9)"), (-1, "label -1 is negative"),
])
def test_label_problem(label, problem):
    assert label_problem(label, NUM_CLASSES) == problem
    assert label_problem(label, None) == (problem if label < 0 else None)


@pytest.mark.parametrize("spelling", ["list", "brace", "glob"])
def test_loose_shards_skip_a_label_outside_the_model_and_the_loss_never_sees_it(tmp_path, caplog, spelling):
    """The defect: a shard given directly holding one sample labelled 10 for a 10-class model passed the start
    check and the loss raised IndexError. Now every path skips it (counted, shard and key in the log)."""
    shards = _loose_shards(tmp_path)
    url = {"list": [str(s) for s in shards], "brace": f"{tmp_path}/train-{{000000..000001}}.tar",
           "glob": f"{tmp_path}/train-*.tar"}[spelling]
    loader = make_train_loader(url, DataConfig(dataset="digits", batch_size=8, loader_processes=0, shuffle_buffer=4),
                               image_size=32, num_classes=NUM_CLASSES)
    head = torch.nn.functional.normalize(torch.randn(NUM_CLASSES, 16), dim=1)
    with caplog.at_level(logging.WARNING, logger="lipnext_scale.data"):
        batches = iter(loader)
        labels = torch.cat([next(batches)[1] for _ in range(6)])  # 48 samples: both shards drawn
    assert labels.min() >= 0 and labels.max() < NUM_CLASSES
    loss = certified_loss(torch.randn(len(labels), NUM_CLASSES), labels, head, 0.1, LossConfig())
    assert torch.isfinite(loss)
    logged = " ".join(r.getMessage() for r in caplog.records)
    shard = str(shards[1])  # a glob names it file://...
    assert f"'bad-000' in shard " in logged and f"{shard}: label 10 is outside the model's 10 classes" in logged
    assert f"'bad-001' in shard " in logged and f"{shard}: label -1 is negative" in logged
    assert loader.dataset.stats.by_reason["label 10 is outside the model's 10 classes"] >= 1


def test_the_eval_stream_and_the_shard_reader_apply_the_same_rule(tmp_path, caplog):
    shards = _loose_shards(tmp_path)
    loader = make_eval_loader([str(s) for s in shards], DataConfig(dataset="digits", batch_size=5, loader_processes=0),
                              image_size=32, num_classes=NUM_CLASSES)
    keys = [k for _, labels, batch_keys in loader for k in batch_keys]
    assert len(keys) == 16 and "bad-000" not in keys and "bad-001" not in keys  # every good sample, once
    stats = SkipStats()
    read = [key for key, _, _ in iter_shard_samples(str(shards[1]), stats=stats, num_classes=NUM_CLASSES)]
    assert read == [f"bad-{i:03d}" for i in range(2, 8)] and stats.total == 2
    assert len(list(iter_shard_samples(str(shards[1])))) == 7  # without a class count only -1 is refused


def test_certification_refuses_the_label_with_one_line(tmp_path):
    from lipnext_scale.certify.data_access import check_sample, iter_shard_samples as certify_samples
    from lipnext_scale.certify.model_loading import CertifyError

    shard = _loose_shards(tmp_path)[1]
    key, image, label = next(certify_samples(str(shard)))
    with pytest.raises(CertifyError) as e:
        check_sample(str(shard), key, image, label, 32, NUM_CLASSES)
    assert str(e.value) == (f"shard {str(shard)!r}, sample 'bad-000': label 10 is outside the model's 10 classes "
                            "(0..9); this data set does not match the checkpoint")
