"""Certification math against closed forms and brute force; eps parsing errors."""

import itertools
import math

import pytest
import torch

from lipnext_scale.certify.certify import certified_accuracy, certified_radius, head_pair_distances
from lipnext_scale.eps import CertifyInputError, format_eps, parse_eps, parse_eps_list


def _brute_force_radius(W, b, x):
    """Smallest ||delta|| that makes some j beat the predicted class y for f(x) = W x + b.

    The boundary f_y = f_j is the hyperplane (w_y - w_j) . z = b_j - b_y; the distance from x to it is
    (f_y - f_j) / ||w_y - w_j||. Minimise over j by enumeration.
    """
    f = W @ x + b
    y = int(f.argmax())
    best = math.inf
    for j in range(W.shape[0]):
        if j == y:
            continue
        d = W[y] - W[j]
        best = min(best, float((f[y] - f[j]) / d.norm()))
    return y, best


def test_radius_matches_brute_force_on_a_linear_model():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 6, dtype=torch.float64, generator=g)
    b = torch.randn(5, dtype=torch.float64, generator=g)
    xs = torch.randn(20, 6, dtype=torch.float64, generator=g)
    logits = xs @ W.t() + b
    pred, _, radius = certified_radius(logits, head_pair_distances(W))
    for i, x in enumerate(xs):
        y, r = _brute_force_radius(W, b, x)
        assert int(pred[i]) == y
        assert radius[i].item() == pytest.approx(r, rel=1e-12)
        # the radius is tight for a linear model: stepping just past it along the worst direction flips
        j_star = min((j for j in range(5) if j != y),
                     key=lambda j: float((W[y] - W[j]) @ x + b[y] - b[j]) / float((W[y] - W[j]).norm()))
        d = (W[y] - W[j_star]) / (W[y] - W[j_star]).norm()
        x_adv = x - (r * (1 + 1e-6)) * d
        f_adv = W @ x_adv + b
        assert f_adv[j_star] > f_adv[y]


def test_generic_radius_is_margin_over_sqrt2_and_lipschitz_scales():
    logits = torch.tensor([[3.0, 1.0, 0.5], [0.0, 2.0, 1.5]])
    pred, margin, radius = certified_radius(logits)
    assert pred.tolist() == [0, 1]
    assert margin.tolist() == pytest.approx([2.0, 0.5])
    assert radius.tolist() == pytest.approx([2.0 / math.sqrt(2), 0.5 / math.sqrt(2)])
    _, _, r2 = certified_radius(logits, lipschitz=2.0)
    assert r2.tolist() == pytest.approx((radius / 2).tolist())


def test_margins_are_float64_even_from_bf16_logits():
    logits = torch.randn(4, 3).to(torch.bfloat16)
    _, margin, radius = certified_radius(logits)
    assert margin.dtype == torch.float64 and radius.dtype == torch.float64


def test_identical_head_rows_never_flip():
    W = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    logits = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)  # rows 0, 1 equal: gap from biases only
    _, _, radius = certified_radius(logits, head_pair_distances(W))
    assert radius.item() == pytest.approx(2.0 / math.sqrt(2))  # only class 2 constrains


def test_certified_accuracy_counts_strictly():
    pred = torch.tensor([0, 1, 1, 2])
    labels = torch.tensor([0, 1, 0, 2])
    radius = torch.tensor([0.5, 36 / 255, 1.0, 0.0], dtype=torch.float64)
    acc = certified_accuracy(pred, radius, labels, parse_eps_list("0,36/255,72/255"))
    assert acc["clean"] == pytest.approx(0.75)
    assert acc["0"] == pytest.approx(0.5)  # radius 0 is not > 0
    assert acc["36/255"] == pytest.approx(0.25)  # radius == eps is not certified
    assert acc["72/255"] == pytest.approx(0.25)


def test_eps_parsing():
    assert parse_eps("36/255") == pytest.approx(36 / 255)
    assert parse_eps(" 1.0 ") == 1.0
    assert parse_eps_list("36/255,72/255,108/255") == pytest.approx([36 / 255, 72 / 255, 108 / 255])
    assert format_eps(36 / 255) == "36/255" and format_eps(1.0) == "1" and format_eps(0.5) == "0.5"


@pytest.mark.parametrize("bad,match", [("36/0", "division by zero"), ("-1", "negative"),
                                       ("abc", "not a number"), ("", "empty"), ("1/3+1", "not a number")])
def test_bad_eps_is_named(bad, match):
    with pytest.raises(CertifyInputError, match=match):
        parse_eps_list(bad)


def test_bad_logits_are_named():
    with pytest.raises(CertifyInputError, match="NaN or inf"):
        certified_radius(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(CertifyInputError, match="shape"):
        certified_radius(torch.tensor([1.0, 2.0]))
    with pytest.raises(CertifyInputError, match="lipschitz"):
        certified_radius(torch.tensor([[1.0, 2.0]]), lipschitz=0.0)


def test_pair_distances_are_exact_for_nearly_equal_rows():
    base = torch.randn(1, 64, dtype=torch.float64) * 1e3
    W = torch.cat([base, base + 1e-6 * torch.eye(64, dtype=torch.float64)[:1]])
    d = head_pair_distances(W)
    assert d[0, 1].item() == pytest.approx(1e-6, rel=1e-6)
    for i, j in itertools.product(range(2), repeat=2):
        assert d[i, j] == d[j, i]


@pytest.mark.parametrize("eps", [36 / 255, 72 / 255, 1.0, 0.5, 0.04999996, 0.05, 1e-5, 2.0, 0.1411764705882353 + 1e-16,
                                 0.1 + 0.2, 3 / 255 + 2 ** -40])
def test_eps_labels_round_trip(eps):
    label = format_eps(eps)
    assert parse_eps(label) == eps
    assert ("/255" in label) == (eps != int(eps) and round(eps * 255) / 255 == eps)


def test_eps_labels_are_exact():
    assert format_eps(0.04999996) == "0.04999996"  # %g said "0.05"
    assert format_eps(108 / 255) == "108/255" and format_eps(255 / 255) == "1" and format_eps(0.3) == "0.3"
    assert format_eps(0.1 + 0.2) == "0.30000000000000004"


def test_colliding_eps_are_refused_in_one_line():
    with pytest.raises(CertifyInputError, match=r"'36/255' and '0.1411764705882353' are the same radius \(36/255\)"):
        parse_eps_list("36/255,0.1411764705882353")
    with pytest.raises(CertifyInputError, match="same radius"):
        parse_eps_list("0.5, 1/2")
    assert parse_eps_list("0.04999996,0.05") == [0.04999996, 0.05]  # close is not equal


def test_allowances_follow_the_closed_form():
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)  # rows 0 and 2 identical
    logits = torch.tensor([[3.0, 1.0, 2.5]], dtype=torch.float64)
    d = head_pair_distances(W)
    _, _, exact = certified_radius(logits, d)
    assert exact.item() == pytest.approx(2.0 / math.sqrt(2))  # the identical row never constrains
    _, _, r = certified_radius(logits, d, 2.0, gap_error=0.1, sample_gap_error=torch.tensor([0.05]),
                               feature_error=0.01)
    assert r.item() == pytest.approx(((2.0 - 0.15) / math.sqrt(2) - 0.01) / 2.0)
    # the identical row's gap (0.5) no longer exceeds its allowance: nothing is guaranteed
    _, _, r = certified_radius(logits, d, gap_error=torch.full((3, 3), 0.5))
    assert r.item() == -math.inf
    with pytest.raises(CertifyInputError, match="gap_error of shape"):
        certified_radius(logits, d, gap_error=torch.zeros(2, 2))
    with pytest.raises(CertifyInputError, match="feature_error must be finite and >= 0"):
        certified_radius(logits, d, feature_error=-1.0)
