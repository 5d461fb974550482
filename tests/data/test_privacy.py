"""fastlm.data.privacy: what is scrubbed, what is left alone, the Luhn checksum, the counts."""

from __future__ import annotations

import pytest

from fastlm.data import PIIScrubber, luhn_valid
from fastlm.data import privacy as pii


@pytest.mark.parametrize(
    ("digits", "valid"),
    [
        ("79927398713", True),  # the classic worked example: sum 70
        ("79927398710", False),
        ("4111111111111111", True),  # Visa's test number
        ("4111111111111112", False),
        ("378282246310005", True),  # American Express's test number
        ("1234567890123456", False),  # doubled digits sum to 32, the others to 32: 64
        ("0", True),
    ],
)
def test_luhn(digits, valid):
    assert luhn_valid(digits) is valid


@pytest.mark.parametrize("bad", ["", "12a4", "\u0661\u0662"])  # Arabic-Indic digits too
def test_luhn_rejects_non_digits(bad):
    with pytest.raises(ValueError, match="digits"):
        luhn_valid(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Write to john.doe+news@example.co.uk.", "Write to <EMAIL>."),
        ("\u00fcn\u00efcode@ex\u00e4mple.de", "<EMAIL>"),
        ("(mail: a@b.com)", "(mail: <EMAIL>)"),
        ("+1 (555) 123-4567", "<PHONE>"),
        ("+44 20 7946 0958", "<PHONE>"),
        ("+33 1 23 45 67 89", "<PHONE>"),
        ("+14155552671", "<PHONE>"),
        ("(555) 123-4567", "<PHONE>"),
        ("call 555-123-4567, or 555.123.4567", "call <PHONE>, or <PHONE>"),
        ("1-800-555-0199", "<PHONE>"),
        ("020 7946 0958", "<PHONE>"),
        ("01 23 45 67 89", "<PHONE>"),
        ("host 192.168.0.1 port", "host <IP> port"),
        ("10.0.0.1:8080", "<IP>:8080"),
        ("2001:db8::8a2e:370:7334.", "<IP>."),
        ("2001:0db8:85a3:0000:0000:8a2e:0370:7334", "<IP>"),
        ("::ffff:192.0.2.128", "<IP>"),
        ("fe80::1:2", "<IP>"),
        ("4111 1111 1111 1111", "<CREDIT_CARD>"),
        ("4111-1111-1111-1111", "<CREDIT_CARD>"),
        ("card 4111111111111111 exp", "card <CREDIT_CARD> exp"),
        ("3782 822463 10005", "<CREDIT_CARD>"),  # American Express grouping, 4-6-5
    ],
)
def test_scrubbed(text, expected):
    assert PIIScrubber()(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "@property",
        "a @ b",
        "user@localhost",
        "x@y.1",  # no address
        "Python 3.11.7",
        "2024-01-15",
        "01-02-2024",
        "12:30:45",
        "1,234,567,890",  # numbers
        "+35236450.6",
        "1234567",
        "555-1234",
        "ISBN 978-3-16-148410-0",
        "+1 2 3",
        "256.1.1.1",
        "1.2.3.4.5",
        "01.02.03.04",
        "v1.2.3.4",  # not dotted quads
        "::1",
        "x[1::2]",
        "std::vector",
        "a::b",
        "dead:beef::",  # fewer than 3 groups
        "00:1a:2b:3c:4d:5e",
        "1:2:3:4:5:6:7:8:9",  # MAC address, 9 groups
        "4111 1111 1111 1112",
        "1234567890123456",  # Luhn fails
        "4111 1111-1111 1111",  # separators mixed
        "4111111111111111.5",
        "pi=3.14159265358979",
        "12345678901234567890123",  # 23 digits
    ],
)
def test_left_alone(text):
    scrubber = PIIScrubber()
    assert scrubber(text) == text
    assert sum(scrubber.counts.values()) == 0


def test_counts_per_type_accumulate_over_calls():
    scrubber = PIIScrubber()
    first = (
        "Contact ann@example.org or bob@example.com, +44 20 7946 0958; servers 10.1.2.3 "
        "and 2001:db8::1:2; card 4111 1111 1111 1111 (not 4111 1111 1111 1112)."
    )
    assert scrubber(first) == (
        "Contact <EMAIL> or <EMAIL>, <PHONE>; servers <IP> and <IP>; card <CREDIT_CARD> "
        "(not 4111 1111 1111 1112)."
    )
    assert scrubber.counts == {"EMAIL": 2, "PHONE": 1, "IP": 2, "CREDIT_CARD": 1}
    assert scrubber("again: carol@example.net") == "again: <EMAIL>"
    assert scrubber.counts == {"EMAIL": 3, "PHONE": 1, "IP": 2, "CREDIT_CARD": 1}


def test_an_address_inside_an_email_is_one_email():
    # Digits in a local part and an IP-like domain stay inside the e-mail placeholder.
    scrubber = PIIScrubber()
    assert scrubber("user.5551234567@mail.example.com") == "<EMAIL>"
    assert scrubber.counts == {"EMAIL": 1, "PHONE": 0, "IP": 0, "CREDIT_CARD": 0}


def _unwindowed(text: str) -> str:
    """Each pattern run over the whole text, as a plain ``re.sub``: the windowed scan must
    find exactly these matches."""
    s = PIIScrubber()
    text = pii._EMAIL_RE.sub(s._email, text)
    text = pii._IPV6_RE.sub(s._ipv6, text)
    return pii._DIGITS_RE.sub(s._digits, text)


def test_windowed_scan_equals_a_full_scan(corpus):
    extra = [
        "a@b.com c@d.org 10.0.0.1 10.0.0.2 +1 555 123 4567 and (555) 123-4567",
        "x" * 70 + "@example.com " + "1:2" * 30 + " 2001:db8::1:2:3",
        "4111111111111111 4111111111111111 " + "9" * 40,
    ]
    scrubber = PIIScrubber()
    for text in corpus + extra:
        assert scrubber(text) == _unwindowed(text)
    assert scrubber.counts["EMAIL"] > 20 and scrubber.counts["IP"] > 50  # the corpus has them
