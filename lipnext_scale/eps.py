"""Certification radii as text: parse '36/255' exactly (no eval) and label a radius exactly.

At the bottom of the import graph (pure Python), so the config can validate `certify.eps` at load time
and certification, training's estimate and reports all label radii the same way.
"""

from __future__ import annotations

import math
from fractions import Fraction

from lipnext_scale.errors import LipnextError

DEFAULT_EPS = "36/255,72/255,108/255"


class CertifyInputError(LipnextError, ValueError):
    """Input to the certification math is unusable; the message names the value and the allowed range."""


def parse_eps(text: str) -> float:
    """'36/255' -> 0.1411..., '0.5' -> 0.5. No eval: a fraction or a decimal, >= 0 and finite."""
    s = str(text).strip()
    try:
        value = Fraction(s)
    except (ValueError, ZeroDivisionError) as e:
        reason = "division by zero" if isinstance(e, ZeroDivisionError) else "not a number or fraction"
        raise CertifyInputError(
            f"eps {s!r}: {reason}; give a non-negative number or fraction such as 36/255 or 0.5") from None
    if value < 0:
        raise CertifyInputError(f"eps {s!r} is negative; eps must be >= 0 (e.g. 36/255)")
    if not math.isfinite(float(value)):
        raise CertifyInputError(f"eps {s!r} is not finite; give a radius such as 36/255")
    return float(value)


def parse_eps_list(text: str | list | tuple) -> list[float]:
    """Distinct radii in the order given; two spellings of one value (36/255 and 0.1411764705882353) are
    an error, since each eps is one column of the report."""
    items = text.split(",") if isinstance(text, str) else list(text)
    items = [str(i).strip() for i in items if str(i).strip()]
    if not items:
        raise CertifyInputError(f"eps list {text!r} is empty; give e.g. {DEFAULT_EPS}")
    values: dict[float, str] = {}
    for item in items:
        value = parse_eps(item)
        if value in values:
            raise CertifyInputError(f"eps {values[value]!r} and {item!r} are the same radius ({format_eps(value)}); "
                                    "give each eps once")
        values[value] = item
    return list(values)


def format_eps(eps: float) -> str:
    """An exact label: 'k/255' when eps is the float nearest k/255 (not an integer), else the shortest
    decimal that parses back to the same float ('1', '0.5', '0.04999996'); `parse_eps(format_eps(e)) == e`."""
    eps = float(eps)
    if not math.isfinite(eps):
        raise CertifyInputError(f"eps {eps}: must be finite")
    k = round(eps * 255)
    if eps != int(eps) and float(Fraction(k, 255)) == eps:
        return f"{k}/255"
    if eps == int(eps) and abs(eps) < 2 ** 53:
        return str(int(eps))
    return repr(eps)
