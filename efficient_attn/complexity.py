"""What a big-O claim (``Capabilities.time`` / ``.memory``) says about growth in the length N.

A claim is read as a sum of products of powers, and only its dominant term in N counts:

    "O(N)"              -> N^1            "O(N^2)"            -> N^2
    "O(N log N)"        -> N^1 log N      "O(N w)"            -> N^1   (w is fixed)
    "O(N + w^2)"        -> N^1            "O(N d^2)"          -> N^1
    "O(N^2/b + N k b)"  -> N^2            "O(N sqrt(N b))"    -> N^1.5
    "O(N + (N/b)^1.5)"  -> N^1.5          "O(N (w d + d'^2 d))" -> N^1

Accepted forms. ``O(...)`` around an expression of: the length ``N`` (``T`` and ``S``, the
query and key lengths, mean the same thing here); constants, each a lowercase letter with
optional primes or an underscore subscript (``w``, ``d``, ``d'``, ``d_k``); numbers; products
(by juxtaposition or ``*``), quotients ``/``, sums ``+``, parentheses; powers ``^p`` with a
number ``p`` (``1.5`` or ``(3/2)``); ``sqrt(x)``; ``log x`` / ``log(x)`` / ``log^k x``.
Anything else (an exponent in a symbol, ``O(2^N)``, a word such as ``linear``) is refused with
a ``ValueError`` that names the claim and these forms.

Every term of a claim is a positive cost, so the dominant term of a product is the product of
the dominant terms, of a quotient the quotient, and of a sum the largest term. A measured
log-log slope between two lengths is compared with ``Claim.slope_between``: the exact slope of
N^e (log N)^p between them, so a log factor gets its allowance (about +0.10 from 16K to 64K)
and nothing more.

This module reads strings only; it imports nothing of the package and no jax.
"""

from __future__ import annotations

import dataclasses
import math
import re
from fractions import Fraction

__all__ = ["Claim", "parse_claim", "claimed_exponent", "ACCEPTED_FORMS"]

ACCEPTED_FORMS = (
    "'O(...)' around the length N (T and S mean it too), constants as lowercase letters "
    "(w, d, d', d_k), numbers, products (juxtaposition or *), '/', '+', parentheses, '^' with a "
    "number, sqrt(x), log x; e.g. 'O(N)', 'O(N log N)', 'O(N^2)', 'O(N w)', 'O(N + w^2)', "
    "'O(N^2/b + N k b)', 'O(N d^2)', 'O(N sqrt(N b))'"
)

_LENGTHS = frozenset({"N", "T", "S"})
_CONSTANT = re.compile(r"[a-z](?:_[a-z0-9]+)?'*")
_TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d+)?)|(?P<name>[A-Za-z][A-Za-z0-9_]*'*)|(?P<op>[-+*/^()]))")


@dataclasses.dataclass(frozen=True)
class Claim:
    """The dominant term N^exponent (log N)^log_power of a big-O claim (``text``)."""

    text: str
    exponent: float
    log_power: float = 0.0

    @property
    def subquadratic(self) -> bool:
        """Grows slower than N^2 (a log factor on N^2 or above is not subquadratic)."""
        return self.exponent < 2

    def slope_between(self, n_lo: float, n_hi: float) -> float:
        """The log-log slope of N^e (log N)^p between two lengths: e + p ln(ln n_hi / ln n_lo) / ln(n_hi / n_lo)."""
        if not 1 < n_lo < n_hi:
            raise ValueError(f"slope_between needs 1 < n_lo < n_hi, got {n_lo}, {n_hi}")
        logs = self.log_power * math.log(math.log(n_hi) / math.log(n_lo)) if self.log_power else 0.0
        return self.exponent + logs / math.log(n_hi / n_lo)


@dataclasses.dataclass(frozen=True)
class _Term:
    """A monomial N^e (log N)^p times constants (the constants do not matter)."""

    e: Fraction = Fraction(0)
    p: Fraction = Fraction(0)

    def __mul__(self, other: "_Term") -> "_Term":
        return _Term(self.e + other.e, self.p + other.p)

    def __truediv__(self, other: "_Term") -> "_Term":
        return _Term(self.e - other.e, self.p - other.p)

    def __pow__(self, k: Fraction) -> "_Term":
        return _Term(self.e * k, self.p * k)

    def key(self) -> tuple[Fraction, Fraction]:
        return (self.e, self.p)


class _Parser:
    """Recursive descent over the tokens of one claim; every rule returns the dominant _Term."""

    def __init__(self, claim: str, body: str):
        self.claim = claim
        self.tokens: list[tuple[str, str]] = []
        pos = 0
        while pos < len(body):
            if body[pos:].strip() == "":
                break
            m = _TOKEN.match(body, pos)
            if not m:
                self.fail(f"unexpected {body[pos:].lstrip()[0]!r}")
            kind = m.lastgroup
            self.tokens.append((kind, m.group(kind)))
            pos = m.end()
        self.i = 0

    def fail(self, why: str):
        raise ValueError(f"cannot read the complexity claim {self.claim!r}: {why}. Accepted forms: {ACCEPTED_FORMS}")

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            self.fail("it ends too early" if value is None else f"expected {value!r} at the end")
        if value is not None and tok[1] != value:
            self.fail(f"expected {value!r}, found {tok[1]!r}")
        self.i += 1
        return tok

    def parse(self) -> _Term:
        if not self.tokens:
            self.fail("it is empty inside O(...)")
        term = self.sum()
        if self.peek() is not None:
            self.fail(f"unexpected {self.peek()[1]!r}")
        return term

    def sum(self) -> _Term:
        best = self.product()
        while self.peek() == ("op", "+"):
            self.take()
            best = max(best, self.product(), key=_Term.key)
        return best

    def _starts_factor(self) -> bool:
        tok = self.peek()
        return tok is not None and (tok[0] in ("num", "name") or tok[1] == "(")

    def product(self) -> _Term:
        term = self.power()
        while True:
            tok = self.peek()
            if tok == ("op", "*"):
                self.take()
                term = term * self.power()
            elif tok == ("op", "/"):
                self.take()
                term = term / self.power()
            elif self._starts_factor():
                term = term * self.power()
            else:
                return term

    def number(self) -> Fraction:
        """A power: a number, or a parenthesised number or ratio such as (3/2)."""
        if self.peek() == ("op", "("):
            self.take()
            value = self.number()
            if self.peek() == ("op", "/"):
                self.take()
                value = value / self.number()
            self.take(")")
            return value
        kind, text = self.take()
        if kind != "num":
            self.fail(f"a power must be a number, found {text!r}")
        return Fraction(text)

    def power(self) -> _Term:
        term = self.atom()
        if self.peek() == ("op", "^"):
            self.take()
            k = self.number()
            if k <= 0:
                self.fail(f"a power must be positive, found {k}")
            term = term**k
        return term

    def atom(self) -> _Term:
        kind, text = self.take()
        if kind == "num":
            return _Term()
        if text == "(":
            term = self.sum()
            self.take(")")
            return term
        if text == "sqrt":
            return self.power() ** Fraction(1, 2)
        if text == "log":
            k = Fraction(1)
            if self.peek() == ("op", "^"):
                self.take()
                k = self.number()
            inner = self.power()
            # the log of a quantity growing in N is one log factor; of a constant, a constant
            return _Term(Fraction(0), k if inner.e > 0 else Fraction(0))
        if kind == "name":
            if text in _LENGTHS:
                return _Term(Fraction(1))
            if _CONSTANT.fullmatch(text):
                return _Term()
            self.fail(f"unknown symbol {text!r} (the length is N; a constant is one lowercase letter)")
        self.fail(f"unexpected {text!r}")


def parse_claim(text: str) -> Claim:
    """The dominant term of a big-O claim, e.g. ``parse_claim("O(N^2/b + N k b)").exponent == 2``."""
    if not isinstance(text, str):
        raise ValueError(f"a complexity claim must be a string, got {text!r}. Accepted forms: {ACCEPTED_FORMS}")
    m = re.fullmatch(r"\s*O\s*\((.*)\)\s*", text, flags=re.DOTALL)
    if m is None:
        raise ValueError(f"cannot read the complexity claim {text!r}: it is not of the form O(...). "
                         f"Accepted forms: {ACCEPTED_FORMS}")
    term = _Parser(text, m.group(1)).parse()
    return Claim(text, float(term.e), float(term.p))


def claimed_exponent(text: str) -> float:
    """The exponent of N in the dominant term of ``text`` (log factors not counted)."""
    return parse_claim(text).exponent
