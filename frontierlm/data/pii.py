"""PII redaction: e-mail addresses, IP addresses and phone numbers become placeholders.

As in FineWeb/datatrove's PII step, matches are replaced, never dropped: `<EMAIL>`, `<IP>`,
`<PHONE>`, counted per kind in the step's counts and in `meta["pii"]`. The patterns lean towards
precision: version strings ("3.11.4", "version 1.0.0.1"), dates ("2023-01-15", "15.01.2023"),
prices ("$1,234.56") and thousands ("12 345 678") must survive, so
- an IPv4 address is four dotted octets 0-255 with no fifth part, not glued to a word and not
  after "version"/"release"/"v"; IPv6 needs at least three groups or the full eight and must
  parse (`ipaddress`);
- a phone number is grouped digits (space, dot or dash separators, optional "+country" and
  "(area)") with 10 to 15 digits in all, a last group of 4+ digits, a 3+ digit area code when
  there is no country code, no date inside, and no number right before or after it; a bare run
  of digits is not one (order numbers, IDs), nor is a 7-digit local number ("555-1234"): too
  close to everything else made of digits. Tested on the shipped Python docs and Common Crawl
  pages, where the looser first version took `ls -l` listings and Fibonacci rows for phones.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

from frontierlm.data.documents import Document
from frontierlm.data.pipeline import Step

EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][\w.+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,24}(?![\w-])"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d)")
# Candidates only; `ipaddress` decides. Hex groups joined by ':' with at most one '::'.
IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
PHONE = re.compile(
    # Not inside a run of numbers ("0 1 1 2 3 5 8 13 21 34 ..."), a price, a path or a list.
    r"(?<![\w+$€£¥.,/:-])(?<!\d[ \t])"
    r"(?:\+\d{1,3}[ .-]?)?"  # country code
    r"(?:\(\d{1,4}\)[ .-]?|\d{2,4}[ .-])"  # area code, bracketed or followed by a separator
    r"\d{2,4}(?:[ .-]?\d{2,4}){1,2}"
    r"(?![\w]|[.,/:-]\d|[ \t]\d)"
)
_GROUP_SEP = re.compile(r"[ .()+-]+")
# ISO and European dates inside a longer digit sequence ("609 2008-06-09 13:26").
_DATE = re.compile(r"(?:19|20)\d\d-[01]\d-[0-3]\d|[0-3]\d-[01]\d-(?:19|20)\d\d")
# A dotted quad right after these words is a version, not an address.
_VERSION_BEFORE = re.compile(r"(?i)\b(?:version|release|ver\.?|build|v)\s*$")

_DOTTED_PHONE = re.compile(r"(?:\+1[ .])?\d{3}\.\d{3}\.\d{4}")

PLACEHOLDERS = {"email": "<EMAIL>", "ip": "<IP>", "phone": "<PHONE>"}


def _not_version(m: re.Match[str]) -> bool:
    return _VERSION_BEFORE.search(m.string, max(0, m.start() - 12), m.start()) is None


def _is_ipv6(candidate: str) -> bool:
    groups = [g for g in candidate.split(":") if g]
    if len(groups) < 3 and "::" in candidate:
        return False  # "a::b", "[::2]" slices, C++ "std::" and the like
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def _is_phone(candidate: str) -> bool:
    digits = sum(c.isdigit() for c in candidate)
    if not 10 <= digits <= 15 or _DATE.search(candidate):
        return False
    groups = [g for g in _GROUP_SEP.split(candidate) if g]
    # Phone layouts end in a group of 4+ digits ("123-4567", "7946 0958", "1234567"), and
    # without a country code the first group is an area code of 3+ digits ("030", "(555)");
    # "11 39916800" or "144 233 377" are numbers in a table.
    international = candidate.startswith("+")
    if len(groups[-1]) < 4 or (not international and len(groups[0]) < 3):
        return False
    # Dots as separators only in the North American 3-3-4 form ("555.123.4567"): other dotted
    # digit groups are versions, section numbers or European dates.
    return "." not in candidate or _DOTTED_PHONE.fullmatch(candidate) is not None


def redact(text: str, counts: Counter[str] | None = None) -> str:
    """`text` with e-mails, IPs and phone numbers replaced; `counts[kind]` += replacements."""
    found: Counter[str] = Counter()

    def sub(kind: str, pattern: re.Pattern[str], keep: object, s: str) -> str:
        def one(m: re.Match[str]) -> str:
            if callable(keep) and not keep(m):
                return m.group(0)
            found[kind] += 1
            return PLACEHOLDERS[kind]

        return pattern.sub(one, s)

    # E-mails first: their domains can hold digits a later pattern would take apart.
    text = sub("email", EMAIL, None, text)
    text = sub("ip", IPV4, _not_version, text)
    text = sub("ip", IPV6, lambda m: _is_ipv6(m.group(0)), text)
    text = sub("phone", PHONE, lambda m: _is_phone(m.group(0)), text)
    if counts is not None:
        counts.update(found)
    return text


class PIIRedact(Step):
    """Replace e-mail addresses, IP addresses and phone numbers with placeholders; counts per
    kind (`email`, `ip`, `phone`) in the step's counts and `meta["pii"]`. Never drops."""

    name = "pii"

    def rewrite(self, doc: Document, counts: Counter[str]) -> str | None:
        found: Counter[str] = Counter()
        new = redact(doc.text, found)
        if not found:
            return None
        counts.update(found)
        doc.meta["pii"] = dict(found)
        return new
