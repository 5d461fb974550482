"""Scrubbing personal data: e-mail addresses, phone numbers, IP addresses and payment card
numbers are replaced by typed placeholders (``<EMAIL>``, ``<PHONE>``, ``<IP>``,
``<CREDIT_CARD>``), and counted.

Each kind is a precompiled regular expression whose candidates are then checked in Python,
where a regex alone would either miss or over-match: IPv6 candidates must parse
(``ipaddress.IPv6Address``), card numbers must pass the Luhn checksum, phone numbers must
hold a plausible count of digits. Version numbers ("3.11.7"), dates ("2024-01-15"), times
("12:30:45"), Python slices ("x[1::2]") and long integers that fail the checksum stay.

Each kind's full pattern only runs in short windows around its anchors, which a simpler
regex that the engine can skip to finds: an "@", a colon before a hex digit or a colon, a
run of 7 or more digits and separators. Text without them costs three fast scans (78 MB/s
per core on English text, ``bench/bench_data.py``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

PLACEHOLDERS = {
    "EMAIL": "<EMAIL>",
    "PHONE": "<PHONE>",
    "IP": "<IP>",
    "CREDIT_CARD": "<CREDIT_CARD>",
}

# Local part (at most 64 characters, RFC 5321) and domain labels; \w covers internationalized
# (Unicode) addresses. The lookbehind makes a match start at the beginning of the local
# part, not inside it.
_EMAIL_RE = re.compile(
    r"(?<![\w.%+-])(?=[\w.%+-]{1,64}@)[\w%+-]+(?:\.[\w%+-]+)*"
    r"@(?:[^\W_](?:[\w-]*[^\W_])?\.)+[^\W\d_]{2,}(?![\w-])"
)

# A run of hex digits, colons and dots holding two colons; validated by ipaddress.
_IPV6_RE = re.compile(r"(?<![\w:.])[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:[0-9A-Fa-f:.]*")

# Where each kind can be: an e-mail address around an "@" (local parts are at most 64
# characters, domains 255), an IPv6 address around a colon before a hex digit or a colon (at
# most 39 characters before it, 45 in all), digit-based kinds inside a run of 7 or more
# ASCII digits, spaces and ".-()+" that starts with a digit (none is shorter than "1.2.3.4"),
# or one character earlier ("+1 ...", "(555) ..."); the two characters after the run are
# the context the final lookahead reads. Character classes, not \\d: the regex engine
# tests [0-9] faster than the Unicode digit category.
_AT_RE = re.compile("@")
_COLON_RE = re.compile(":(?=[0-9A-Fa-f:])")
_NUMBER_RE = re.compile(r"[0-9][0-9 ().+-]{6,}")

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Digits-based kinds share one pass. No match may start or end inside a longer number, word
# or dotted sequence (so "1.2.3.4.5" and "555-123-4567-8" are not matched).
_DIGITS_RE = re.compile(
    r"""
    (?<![\w.+-])
    (?:
        (?P<card>\d{13,19}|\d{4}(?P<sep>[ -])\d{3,6}(?:(?P=sep)\d{3,6}){1,3})
      | (?P<ipv4>(?:"""
    + _OCTET
    + r"""\.){3}"""
    + _OCTET
    + r""")
      | (?P<international>\+\d{1,3}(?:[ .-]?\(\d{1,4}\)|[ .-]?\d{1,4})(?:[ .-]?\d{2,4}){1,5})
      | (?P<north_american>(?:1[ .-])?(?:\(\d{3}\)[ ]?|\d{3}[ .-])\d{3}[ .-]\d{4})
      | (?P<trunk>0\d{1,4}(?:[ -]\d{2,4}){2,4})
    )
    (?!\w|[.,-]?\d)
    """,
    re.VERBOSE | re.ASCII,
)
# Digits a phone number of each form may hold: E.164 allows up to 15 with the country code.
_PHONE_DIGITS = {"international": (8, 15), "north_american": (10, 11), "trunk": (10, 11)}


def luhn_valid(digits: str) -> bool:
    """Whether a string of decimal digits passes the Luhn checksum (ISO/IEC 7812): doubling
    every second digit from the right (subtracting 9 from results above 9), the sum of all
    digits is a multiple of 10."""
    if not digits.isdigit() or not digits.isascii():
        raise ValueError(f"digits must be a non-empty string of ASCII digits, got {digits!r}")
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _ipv6(candidate: str) -> bool:
    """A full IPv6 address of at least three groups (an embedded IPv4 counts as two): the
    loopback ``::1`` and slices such as ``x[1::2]`` hold fewer."""
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    groups = sum(1 for g in candidate.split(":") if g)
    return groups + ("." in candidate) >= 3


class PIIScrubber:
    """Replaces personal data in texts by placeholders and counts replacements per type
    (``counts``: ``"EMAIL"``, ``"PHONE"``, ``"IP"``, ``"CREDIT_CARD"``), over every text it is
    called on.

    - ``EMAIL``: ``local@domain.tld`` (a dot-separated local part of at most 64 letters,
      digits and ``%+-_``; domain labels; a top-level domain of two or more letters);
    - ``IP``: IPv4 dotted quads of octets 0-255 without leading zeros, and IPv6 addresses
      in any notation ``ipaddress`` accepts (compressed ``::``, embedded IPv4) of at least
      three groups;
    - ``CREDIT_CARD``: 13 to 19 digits, contiguous or in groups (the first of 4 digits, the
      others of 3 to 6) separated by one kind of separator (space or dash), that pass the
      Luhn checksum;
    - ``PHONE``: international numbers (``+`` and a country code, then groups separated by
      spaces, dots, dashes or in parentheses, 8 to 15 digits in all), North American
      numbers (``(555) 123-4567``, ``555-123-4567``, ``555.123.4567``, ``1-800-555-0199``)
      and numbers with a trunk prefix 0 in groups of 2 to 4 digits (``020 7946 0958``,
      ``01 23 45 67 89``; 10 or 11 digits).

    A text is scanned for e-mail addresses, then IPv6 addresses, then the other kinds in one
    pass, so a placeholder never splits another match.
    """

    def __init__(self) -> None:
        self.counts = dict.fromkeys(PLACEHOLDERS, 0)

    def _email(self, m: re.Match[str]) -> str:
        self.counts["EMAIL"] += 1
        return PLACEHOLDERS["EMAIL"]

    def _ipv6(self, m: re.Match[str]) -> str:
        candidate = m.group()
        # A sentence may end right after an address; the dot is not part of it.
        stripped = candidate.rstrip(".")
        if not _ipv6(stripped):
            return candidate
        self.counts["IP"] += 1
        return PLACEHOLDERS["IP"] + candidate[len(stripped) :]

    def _digits(self, m: re.Match[str]) -> str:
        found = m.group()
        digits = "".join(ch for ch in found if ch.isdigit())
        if m.group("card"):
            key = "CREDIT_CARD"
            valid = 13 <= len(digits) <= 19 and luhn_valid(digits)
        elif m.group("ipv4"):
            key, valid = "IP", True
        else:
            (form,) = (name for name in _PHONE_DIGITS if m.group(name))
            lo, hi = _PHONE_DIGITS[form]
            key, valid = "PHONE", lo <= len(digits) <= hi
        if not valid:
            return found
        self.counts[key] += 1
        return PLACEHOLDERS[key]

    def _sub(
        self,
        text: str,
        anchors: re.Pattern[str],
        pattern: re.Pattern[str],
        before: int,
        after: int,
        replace: Callable[[re.Match[str]], str],
    ) -> str:
        """``pattern.sub(replace, text)`` for matches that contain a match of ``anchors``
        and lie within ``before`` characters before it and ``after`` after it.

        Patterns that start with a lookbehind make the regex engine try every position of
        the text (12-35 MB/s); ``anchors`` start with a literal or a character class, which
        it skips to directly, so only short windows around them get the full pattern."""
        parts, done = [], 0
        for anchor in anchors.finditer(text):
            if anchor.start() < done:
                continue
            window = (max(done, anchor.start() - before), min(len(text), anchor.end() + after))
            for m in pattern.finditer(text, *window):
                if m.end() == window[1] < len(text):
                    break  # it may go on past the window; a longer run is no valid match
                new = replace(m)
                if new != m.group():
                    parts += (text[done : m.start()], new)
                    done = m.end()
        return "".join(parts) + text[done:] if parts else text

    def __call__(self, text: str) -> str:
        """``text`` with every e-mail address, IP address, card number and phone number
        replaced by its placeholder."""
        text = self._sub(text, _AT_RE, _EMAIL_RE, 64, 255, self._email)
        text = self._sub(text, _COLON_RE, _IPV6_RE, 39, 46, self._ipv6)
        return self._sub(text, _NUMBER_RE, _DIGITS_RE, 1, 2, self._digits)
