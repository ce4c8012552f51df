"""What a value may be where it enters edgekd: a ``Rule`` per setting, and one-line messages for the rest.

Config files, the command line, ``TrainConfig`` and model kwargs all check their values here, so that each says the
same thing about the same mistake: the key, the value received, what it takes and an example. Bools are not numbers
(``True`` is not 1), a decimal is not a whole number (``10.0`` is refused where an int belongs: nothing silently
truncates or rounds), and NaN and ±inf are no setting's value.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

from edgekd.errors import EdgekdError

# Longest excerpt of a bad value quoted in a message: a whole list pasted by mistake must not flood the line.
_QUOTE_CHARS = 60


@dataclass(frozen=True)
class Rule:
    """The values one setting accepts.

    Args:
        kind: ``int``, ``float``, ``bool``, ``str`` or ``dict`` (a mapping with string keys). A float setting takes an
            int (as a float); an int setting takes no float, not even ``10.0``.
        low, high: bounds of a number, None for none.
        low_open, high_open: the bound itself is excluded.
        optional: None is a value (it means "the default"); only for settings whose default is None.
    """

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False

    def accepts(self, value: Any) -> bool:
        return self._problem(value) is None

    def expected(self) -> str:
        """What to give, as a phrase: ``a finite number > 0``, ``a whole number in [0, 5]``, ``true or false``."""
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return "a string"
        if self.kind is dict:
            return "a mapping of names to values"
        noun = "a whole number" if self.kind is int else "a finite number"
        return noun + self._range_text()

    def check(self, key: str, value: Any, where: str = "", example: str | None = None) -> Any:
        """``value`` as this rule's kind (an int given for a float becomes a float); else a one-line EdgekdError
        ``{where}{key} is {what it is}; give {expected}, e.g. {example}``."""
        problem = self._problem(value)
        if problem is not None:
            hint = f", e.g. {example}" if example else ""
            raise EdgekdError(f"{where}{key} is {problem}; give {self.expected()}{hint}")
        return self.as_kind(value)

    def as_kind(self, value: Any) -> Any:
        """An accepted ``value`` as this rule's kind: numpy numbers become Python's, 1 becomes 1.0 for a float."""
        return value if value is None or self.kind in (bool, str, dict) else self.kind(value)

    def _problem(self, value: Any) -> str | None:
        """What ``value`` is, for the message (``a list ([0.1, 0.2])``, ``nan``), or None when this rule takes it."""
        if value is None:
            return None if self.optional else describe(value)
        if self.kind is bool:
            return None if isinstance(value, bool) else describe(value)
        if self.kind is str:
            return None if isinstance(value, str) else describe(value)
        if self.kind is dict:
            if not isinstance(value, dict):
                return describe(value)
            return (
                None if all(isinstance(k, str) for k in value) else f"a mapping with a key that is no name ({value!r})"
            )
        if self.kind is int and is_real(value) and not is_int(value):
            return f"a decimal number ({value!r})"
        if not is_real(value):
            return describe(value)
        return None if math.isfinite(value) and self._in_range(value) else repr(value)

    def _in_range(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def _range_text(self) -> str:
        low, high = _number_text(self.low), _number_text(self.high)
        if self.low is not None and self.high is not None:
            return f" in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f" {'<' if self.high_open else '<='} {high}"
        return ""


POSITIVE_INT = Rule(int, low=1)
NON_NEGATIVE_INT = Rule(int, low=0)
POSITIVE = Rule(float, low=0, low_open=True)
NON_NEGATIVE = Rule(float, low=0)


def is_int(value: Any) -> bool:
    """A whole number of an integer type; a bool is not one."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A real number (int or float, NaN and ±inf included); a bool is not one."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def describe(value: Any) -> str:
    """``value`` as a message names it: ``null``, ``a boolean (true)``, ``a string ('0.1')``, ``a list ([1, 2])``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if is_real(value):
        return repr(value)
    kind = {str: "a string", list: "a list", tuple: "a list", dict: "a mapping"}.get(type(value))
    return f"{kind or 'a ' + type(value).__name__} ({_quote(value)})"


def _quote(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _QUOTE_CHARS else text[: _QUOTE_CHARS - 3] + "..."


def _number_text(bound: float | None) -> str:
    if bound is None:
        return ""
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"  # 4294967295, not 4.29497e+09
