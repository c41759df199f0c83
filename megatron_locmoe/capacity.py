"""LocMoE's lower bound on expert capacity.

Theorem (LocMoE, arXiv 2401.13920): with orthogonal equal-norm gate rows and tokens uniform on
the sphere S^{d-1}, let delta be the cosine of the largest angle allowed between a token and its
expert's gate row. The capacity an expert needs to see at least one class-discriminative token
satisfies

    ec_min >= 1 / (n * [1 - I_{delta^2}(1/2, (d-1)/2)])
           ~= 1 / (n * erfc(sqrt(delta^2 d / (2 - delta^2))))
           >  (1/n) * exp(delta^2 d / (2 - delta^2))

where 1 - I_{delta^2}(1/2, (d-1)/2) = P(|cos(token, row)| > delta) for a uniform token. The
bound is extremely sensitive to delta (d=4096, n=8: ~2.3 tokens at delta=0.03, ~1e9 at 0.1), so
delta is estimated from the data and the result clamped between a floor and the capacity-factor
ceiling. Everything here is float64 host math on a few scalars; no SciPy at run time.
"""

from __future__ import annotations

import math

import torch


def _betacf(a: float, b: float, x: float, max_iter: int = 10_000, eps: float = 1e-15) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(
        f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})"
    )


def _log_front(a: float, b: float, x: float) -> float:
    return (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )


def betainc_upper(a: float, b: float, x: float) -> float:
    """1 - I_x(a, b), the upper tail of the regularised incomplete beta, without cancellation."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x={x} must lie in [0, 1]")
    if x == 0.0:
        return 1.0
    if x == 1.0:
        return 0.0
    front = math.exp(_log_front(a, b, x))
    if x < (a + 1.0) / (a + b + 2.0):
        return 1.0 - front * _betacf(a, b, x) / a
    return front * _betacf(b, a, 1.0 - x) / b


def angular_tail(d: int, delta: float) -> float:
    """P(|cos(u, w)| > delta) for u uniform on S^{d-1} and any fixed w: 1 - I_{delta^2}(1/2, (d-1)/2)."""
    if d < 2:
        raise ValueError(f"hidden size d={d} must be at least 2")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta={delta} must lie in [0, 1] (a cosine)")
    return betainc_upper(0.5, (d - 1) / 2.0, delta * delta)


def ec_min(d: int, n: int, delta: float) -> float:
    """The exact lower bound on expert capacity (tokens); inf when the tail underflows."""
    tail = angular_tail(d, delta)
    return math.inf if tail == 0.0 else 1.0 / (n * tail)


def ec_min_erfc(d: int, n: int, delta: float) -> float:
    """The paper's erfc approximation of ec_min."""
    return 1.0 / (n * math.erfc(math.sqrt(delta * delta * d / (2.0 - delta * delta))))


def ec_min_exp(d: int, n: int, delta: float) -> float:
    """The paper's closed-form lower estimate (1/n) exp(delta^2 d / (2 - delta^2))."""
    return math.exp(delta * delta * d / (2.0 - delta * delta)) / n


def estimate_delta(cosines: torch.Tensor, percentile: float) -> float:
    """delta = the ``percentile`` quantile of cos(token, gate row of its expert), clipped to [0, 1].

    A low percentile: the largest angular deviation that most routed tokens stay within.
    """
    if cosines.numel() == 0:
        return 0.0
    q = torch.quantile(cosines.detach().double().flatten(), percentile).item()
    return min(max(q, 0.0), 1.0)


def floor_capacity(floor_factor: float, num_tokens: int, topk: int, num_experts: int) -> int:
    """The bound's floor in tokens per expert, a capacity factor rounded up as Megatron's
    capacity is: ceil(factor * T * k / E)."""
    return math.ceil(floor_factor * num_tokens * topk / num_experts)


def clamp_capacity(ec: float, floor: int, ceiling: int) -> int:
    """C = clamp(ceil(ec_min), floor, ceiling) tokens per expert."""
    if floor > ceiling:
        raise ValueError(f"capacity floor {floor} is above the ceiling {ceiling}")
    bound = ceiling if math.isinf(ec) else math.ceil(ec)
    return int(min(max(bound, floor), ceiling))
