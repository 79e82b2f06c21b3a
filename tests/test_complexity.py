"""efficient_attn.complexity: big-O claims read as the dominant power of N (and its log factor)."""

import math

import pytest

import efficient_attn as ea
from efficient_attn.complexity import Claim, claimed_exponent, parse_claim


@pytest.mark.parametrize(
    "claim, exponent, log_power",
    [
        ("O(N)", 1, 0),
        ("O(N log N)", 1, 1),
        ("O(N^2)", 2, 0),
        ("O(N w)", 1, 0),
        ("O(N + w^2)", 1, 0),
        ("O(N^2/b + N k b)", 2, 0),
        ("O(N d^2)", 1, 0),
        ("O(1)", 0, 0),
        ("O(d^2)", 0, 0),
        ("O(log N)", 0, 1),
        ("O(N log(N k))", 1, 1),
        ("O(N log^2 N)", 1, 2),
        ("O(N (log N)^2)", 1, 2),
        ("O(N sqrt(N b))", 1.5, 0),
        ("O(N sqrt N)", 1.5, 0),
        ("O(N + (N/b)^1.5)", 1.5, 0),
        ("O(N^(3/2))", 1.5, 0),
        ("O(N b + (N/b)^2)", 2, 0),
        ("O(N^2 d/b + N k b d)", 2, 0),
        ("O(N (w d + d'^2 d))", 1, 0),
        ("O(N d'^2)", 1, 0),
        ("O(N m d + m^3)", 1, 0),
        ("O(N b (g + r + 3))", 1, 0),
        ("O(N * (k + d_k))", 1, 0),
        ("O(T S)", 2, 0),
        ("O(N^2 / N)", 1, 0),
        ("O(N^2 log N + N^2)", 2, 1),
    ],
)
def test_dominant_term(claim, exponent, log_power):
    c = parse_claim(claim)
    assert (c.exponent, c.log_power) == (exponent, log_power)
    assert claimed_exponent(claim) == exponent


@pytest.mark.parametrize(
    "bad, named",
    [
        ("N^2", "not of the form O(...)"),
        ("linear", "not of the form O(...)"),
        ("O()", "empty"),
        ("O(N + )", "ends too early"),
        ("O(N ? k)", "'?'"),
        ("O(N - k)", "'-'"),
        ("O(N^k)", "a power must be a number"),
        ("O(2^N)", "a power must be a number"),
        ("O(N^0)", "positive"),
        ("O(banana)", "unknown symbol 'banana'"),
        ("O(M)", "unknown symbol 'M'"),
        ("O((N + k)", "expected ')'"),
        ("O(N))", "unexpected ')'"),
    ],
)
def test_unreadable_claims_are_refused_with_the_forms(bad, named):
    with pytest.raises(ValueError) as err:
        parse_claim(bad)
    message = str(err.value)
    assert repr(bad) in message and named in message
    assert "Accepted forms" in message and "O(N log N)" in message


def test_non_string_is_refused():
    with pytest.raises(ValueError, match="must be a string"):
        parse_claim(None)


def test_slope_between_gives_a_log_factor_its_allowance_and_no_more():
    lo, hi = 16384, 65536
    assert parse_claim("O(N^2)").slope_between(lo, hi) == 2
    nlogn = parse_claim("O(N log N)").slope_between(lo, hi)
    # the slope of N log N measured from its own values
    want = math.log(hi * math.log(hi) / (lo * math.log(lo))) / math.log(hi / lo)
    assert nlogn == pytest.approx(want)
    assert 1.05 < nlogn < 1.15
    with pytest.raises(ValueError, match="1 < n_lo < n_hi"):
        parse_claim("O(N)").slope_between(hi, lo)


def test_subquadratic():
    assert parse_claim("O(N sqrt(N b))").subquadratic
    assert not parse_claim("O(N^2/b + N k b)").subquadratic
    assert Claim("O(N)", 1.0).subquadratic


def test_every_registered_claim_is_readable():
    """A variant's time and memory claims feed the scale test and the cost tables: both must parse."""
    for name in ea.list_variants():
        caps = ea.get_spec(name).capabilities
        for which in ("time", "memory"):
            parse_claim(getattr(caps, which))
