"""Certification takes a stored evaluation image exactly as training's evaluation does (`evaluation_view`):
ImageNet's centre crop of images stored at the evaluation resize (256 for 224, `lipnext prep`'s default), the
image itself at the model's size, and a one-line refusal for anything that would need a resize."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lipnext_scale.certify.data_access import check_sample, checkpoint_dataset, evaluation_view
from lipnext_scale.certify.model_loading import CertifyError
from lipnext_scale.data.transforms import eval_transform, to_float_chw


def _stored(width: int, height: int, seed: int = 0) -> Image.Image:
    """An image as a shard stores it (JPEG bytes decoded again)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@pytest.mark.parametrize("size", [(256, 341), (341, 256), (256, 256), (257, 256)])
def test_imagenet_view_equals_trainings_evaluation_transform_exactly(size):
    img = _stored(*size)
    expected = to_float_chw(eval_transform(img, "imagenet", 224))
    view = evaluation_view(to_float_chw(img), 224, "imagenet")
    assert view is not None and view.shape == (3, 224, 224)
    assert torch.equal(view, expected)


def test_the_model_size_is_taken_as_it_is_and_other_sizes_have_no_view():
    img = to_float_chw(_stored(224, 224))
    assert evaluation_view(img, 224, "imagenet") is img and evaluation_view(img, 224, None) is img
    assert evaluation_view(to_float_chw(_stored(288, 300)), 224, "imagenet") is None  # would need a resize
    assert evaluation_view(to_float_chw(_stored(256, 300)), 224, "cifar10") is None  # its evaluation resizes
    assert evaluation_view(to_float_chw(_stored(256, 300)), 224, None) is None  # data set unknown: no guess
    assert evaluation_view(to_float_chw(_stored(200, 200)), 224, "imagenet") is None


def test_check_sample_returns_the_view_or_refuses_in_one_line():
    img = to_float_chw(_stored(256, 300))
    view = check_sample("s.tar", "k", img, 3, 224, 10, "imagenet")
    assert view.shape == (3, 224, 224)
    with pytest.raises(CertifyError) as e:
        check_sample("s.tar", "k", img, 3, 224, 10, "cifar10")
    msg = str(e.value)
    assert "\n" not in msg and "shard 's.tar', sample 'k'" in msg and "image is 300x256" in msg
    assert "image_size=224" in msg and "256" in msg


def test_the_dataset_comes_from_the_checkpoints_job_config():
    assert checkpoint_dataset({"data": {"dataset": "imagenet"}}) == "imagenet"
    assert checkpoint_dataset({"model": {}}) is None and checkpoint_dataset({"data": "x"}) is None
