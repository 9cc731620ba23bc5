"""Weight verification before certification, per-batch certification, and the report's pure parts."""

import json

import pyarrow as pa
import pytest
import torch

from lipnext_scale.certify.certify import certified_radius, head_logits64, model_pair_distances
from lipnext_scale.certify.fp_error import float_error_model
from lipnext_scale.certify.model_loading import CertifyRefused, state_dict_sha256, verify_model
from lipnext_scale.certify.report import build_report, format_table, plot_certified_accuracy, soundness_alarms
from lipnext_scale.certify.worker import Checks, certified_column, certify_batch
from lipnext_scale.model import create_model
from lipnext_scale.model.lipschitz import rigorous_lipschitz_bound


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return create_model("lipnext-tiny", width=32, depth=2).eval()


def test_orthogonal_weights_pass_with_their_bound(tiny):
    v = verify_model(tiny, lipschitz_tol=1e-4, allow_approx=False)
    assert not v.approx and 1.0 <= v.lipschitz_used <= 1 + 1e-4
    assert v.max_orthogonality_error < 1e-5 and len(v.orthogonality_errors) == 5  # stem + 2 x (rot, mix)
    assert json.dumps(v.as_dict())


def test_a_scaled_matrix_is_refused_unless_approx(tiny):
    with torch.no_grad():
        tiny.blocks[0].mix.mul_(1.1)
    with pytest.raises(CertifyRefused, match="blocks.0.mix"):
        verify_model(tiny, lipschitz_tol=1e-4, allow_approx=False)
    v = verify_model(tiny, lipschitz_tol=1e-4, allow_approx=True)
    assert v.approx and v.lipschitz_used == rigorous_lipschitz_bound(tiny) > 1.1
    with torch.no_grad():
        tiny.blocks[0].mix.fill_(float("nan"))
    with pytest.raises(CertifyRefused):  # a NaN bound is never accepted, even approximately
        verify_model(tiny, lipschitz_tol=1e-4, allow_approx=True)


def test_weights_hash_depends_on_values_only():
    a = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
    assert state_dict_sha256(a) == state_dict_sha256({"b": torch.zeros(2), "w": torch.ones(2, 2, dtype=torch.float64)})
    assert state_dict_sha256(a) != state_dict_sha256({"w": torch.ones(2, 2), "b": torch.tensor([0.0, 1e-7])})


def test_certify_batch_matches_the_radius_formula(tiny):
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = head_logits64(tiny.features(x), tiny.head.rows(), tiny.head.bias)
        _, _, exact = certified_radius(logits, model_pair_distances(tiny), 1.25)
        _, _, radius_fp32_logits = certified_radius(tiny(x).double(), model_pair_distances(tiny), 1.25)
    fp_model = float_error_model(tiny, 1.25)
    out = certify_batch(tiny, x, torch.zeros(16, dtype=torch.long), Checks([]), lipschitz=1.25)
    pred, radius = out["prediction"], out["radius"]
    labels = pred.clone()
    labels[:4] = (labels[:4] + 1) % 10  # four wrong: never certified
    eps = [0.0, float(radius.median())]
    out = certify_batch(tiny, x, labels, Checks(eps, attack_steps=3), lipschitz=1.25)
    assert torch.equal(out["prediction"], pred) and torch.equal(out["radius"], radius)
    assert torch.equal(out["radius_exact_arithmetic"], exact)
    # without allowances: the old formula on fp32 logits, up to the fp32 head's rounding
    torch.testing.assert_close(exact, radius_fp32_logits, rtol=1e-5, atol=1e-5)
    # the allowances shrink every radius, by no more than the uniform bounds (over the pixel box) allow
    uniform_e, _ = fp_model.uniform()
    assert (radius < exact).all() and ((exact - radius) * 1.25 < 4 * uniform_e + 1e-3).all()
    for e in eps:
        key = certified_column(e)
        assert torch.equal(out[key], (pred == labels) & (radius > e))
        assert not out[key.replace("certified", "pgd_broken")].any()


def _table(certified, broken):
    n = len(certified)
    return pa.table({"shard": ["s"] * n, "key": [f"k{i}" for i in range(n)], "label": [0] * n,
                     "prediction": [0] * n, "margin": [1.0] * n, "radius": [0.5] * n,
                     "certified@0.1": certified, "pgd_broken@0.1": broken})


def test_alarm_lists_exactly_the_broken_certified_points():
    table = _table([True, True, False, True], [False, True, True, False])
    assert soundness_alarms(table, [0.1]) == [{"eps": "0.1", "shard": "s", "key": "k1"}]


def test_report_table_and_plot():
    table = _table([True, False, True, True], [False, False, False, False])
    verification = {"lipschitz_bound": 1.2, "lipschitz_used": 1.2, "approx": True, "max_orthogonality_error": 0.1}
    report = build_report(table, Checks([0.1], attack_steps=5), verification=verification, checkpoint={"model": "m"},
                          data={"url": "d"}, timing={})
    assert report["samples"] == 4 and report["clean_accuracy"] == 1.0
    assert report["certified_accuracy"] == {"0.1": 0.75}
    assert "1.2" in report["note"] and report["soundness_alarm"] == []
    text = format_table(report)
    assert "75.00%" in text and "APPROXIMATE" in text and "attack breaks" in text
    assert plot_certified_accuracy(table, [0.1], "t")[:4] == b"\x89PNG"


def test_fmn_report_bounds_and_alarms():
    from lipnext_scale.certify.report import empirical_robust_accuracy, min_distance_over_radius

    n = 4
    table = pa.table({"shard": ["s"] * n, "key": [f"k{i}" for i in range(n)], "label": [0, 0, 0, 1],
                      "prediction": [0, 0, 0, 0], "margin": [1.0] * n, "radius": [0.5, 0.05, -1.0, 0.3],
                      "certified@0.1": [True, False, False, False],
                      "attack_distance": [0.8, 0.2, float("inf"), 0.0]})
    assert empirical_robust_accuracy(table, [0.1, 0.5]) == {"0.1": 0.75, "0.5": 0.5}
    smallest = min_distance_over_radius(table)
    assert smallest["ratio"] == pytest.approx(1.6) and smallest["key"] == "k0" and smallest["points"] == 2
    assert soundness_alarms(table, [0.1]) == []
    broken = table.set_column(7, "attack_distance", pa.array([0.09, 0.2, float("inf"), 0.0]))
    assert soundness_alarms(broken, [0.1]) == [{"eps": "0.1", "shard": "s", "key": "k0"},
                                               {"eps": "radius", "shard": "s", "key": "k0"}]
    report = build_report(table, Checks([0.1], attack_steps=5, attack="fmn"),
                          verification={"lipschitz_used": 1.0, "max_orthogonality_error": 0.0},
                          checkpoint={"model": "m"}, data={"url": "d"}, timing={})
    assert report["attack"]["empirical_robust_accuracy"] == {"0.1": 0.75}
    text = format_table(report)
    assert "empirical robust acc" in text and "smallest attack distance / certified radius: 1.6" in text
    assert plot_certified_accuracy(table, [0.1], "t")[:4] == b"\x89PNG"
