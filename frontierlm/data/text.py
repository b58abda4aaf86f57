"""A fast English word splitter that agrees with the one datatrove's web filters count with.

datatrove's Gopher/FineWeb filters count words with a blank spaCy English tokenizer, and their
thresholds (mean word length, alpha-word share, top n-gram share) were tuned on those counts:
"end." is two words there, "end" and ".". `str.split` would shift every ratio, so the published
thresholds would no longer mean what they say. spaCy itself runs at well under 1 MB/s, most of
it in building `Doc` objects the filters never look at, so this module re-implements the part
that decides token boundaries:

1. cut at whitespace;
2. whole chunks in the exception table (contractions, abbreviations) split as listed;
3. otherwise peel leading punctuation (prefixes) and trailing punctuation (suffixes) in turn,
   stopping early when what is left is an exception;
4. what remains is one token if it looks like a URL, else it is cut at infixes (hyphens between
   letters, "..." inside a word, a comma between letters, ...).

Plain alphanumeric chunks (most of English text) skip all of that. The rules are written from
spaCy's documented English punctuation rules; tests/data/test_web_filters_reference.py measures
agreement with the real thing.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from functools import cache

# --------------------------------------------------------------------------- character classes


@cache
def _category_runs() -> list[tuple[int, int, str]]:
    """(first, last, category) for each run of consecutive code points of one Unicode
    category: one pass over the code points, shared by every `_category_class`."""
    runs: list[tuple[int, int, str]] = []
    start, current = 0, unicodedata.category(chr(0))
    for cp, cat in enumerate(map(unicodedata.category, map(chr, range(sys.maxunicode + 1)))):
        if cat != current:
            runs.append((start, cp - 1, current))
            start, current = cp, cat
    runs.append((start, sys.maxunicode, current))
    return runs


@cache
def _category_class(*prefixes: str, exclude: str = "") -> str:
    """A regex character-class body of every code point whose Unicode category starts with one
    of `prefixes` (built once per process because `re` has no \\p{...})."""
    ranges: list[tuple[int, int]] = []
    for first, last, cat in _category_runs():
        if not cat.startswith(prefixes):
            continue
        if not exclude:
            if ranges and ranges[-1][1] == first - 1:
                ranges[-1] = (ranges[-1][0], last)
            else:
                ranges.append((first, last))
            continue
        for cp in range(first, last + 1):
            if chr(cp) in exclude:
                continue
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1] = (ranges[-1][0], cp)
            else:
                ranges.append((cp, cp))
    parts = []
    for lo, hi in ranges:
        low, high = re.escape(chr(lo)), re.escape(chr(hi))
        parts.append(low if lo == hi else f"{low}-{high}")
    return "".join(parts)


_QUOTES = "'\"”“`‘´’‚,„»«「」『』（）〔〕【】《》〈〉〈〉⟦⟧"
_PUNCT = "…,:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪"
_CURRENCY = "$£€¥฿₽﷼₴₠₡₢₣₤₥₦₧₨₩₪₫₭₮₯₰₱₲₳₵₶₷₸₹₺₻₼₾₿"
_UNITS = (
    "km|km²|km³|m|m²|m³|dm|dm²|dm³|cm|cm²|cm³|mm|mm²|mm³|ha|µm|nm|yd|in|ft|kg|g|mg|µg|t|lb|oz|"
    "m/s|km/h|kmh|mph|hPa|Pa|mbar|mb|MB|kb|KB|gb|GB|tb|TB|T|G|M|K|%"
)
_HYPHENS = "---|--|——|[-–—~]"
# Sentence-final characters for the sentence counter (spaCy's sentencizer's common ones).
SENTENCE_END = frozenset("!.?։؟۔܀܁܂߹।॥၊။።፧፨᙮᜵᜶᠃᠉᥄᥅‼‽⁇⁈⁉⸮⸼꓿꘎꘏꛳꛷﹒﹖﹗！．？｡。")


def _cls(chars: str) -> str:
    return "".join(re.escape(c) for c in chars)


@cache
def _patterns() -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    icon = _category_class("So")
    # Scripts without case count as both lower and upper, as in spaCy's classes.
    lower = _category_class("Ll", "Lo")
    upper = _category_class("Lu", "Lo")
    alpha = _category_class("L")
    quote_punct = _cls(_QUOTES + _PUNCT)
    prefix = re.compile(
        r"(?:US\$|C\$|A\$|\.\.+|……|\+(?![0-9])"
        f"|[§%=—–{quote_punct}{_cls(_CURRENCY)}{icon}])"
    )
    suffix = re.compile(
        r"(?:\.\.+|……|'s|'S|’s|’S"
        f"|[—–{quote_punct}{icon}]"
        r"|(?<=[0-9])\+"
        r"|(?<=°[FfCcKk])\."
        f"|(?<=[0-9])(?:US\\$|C\\$|A\\$|[{_cls(_CURRENCY)}])"
        f"|(?<=[0-9])(?:{_UNITS})"
        f"|(?<=[0-9{lower}%²\\-+{quote_punct}|])\\."
        f"|(?<=[{upper}][{upper}])\\.)$"
    )
    infix = re.compile(
        r"\.\.+|…"
        f"|[{icon}]"
        r"|(?<=[0-9])[+\-*^](?=[0-9-])"
        f"|(?<=[{lower}{_cls(_QUOTES)}])\\.(?=[{upper}{_cls(_QUOTES)}])"
        f"|(?<=[{alpha}]),(?=[{alpha}])"
        f"|(?<=[{alpha}0-9])(?:{_HYPHENS})(?=[{alpha}])"
        f"|(?<=[{alpha}0-9])[:<>=/](?=[{alpha}])"
    )
    # Host names, addresses and paths stay one token (no infix cuts inside them).
    url = re.compile(
        r"(?:[\w+\-.]{2,}://)?(?:\S+(?::\S*)?@)?"
        r"(?:\d{1,3}(?:\.\d{1,3}){3}"
        r"|(?:(?:[A-Za-z0-9\u00a1-\uffff][A-Za-z0-9\u00a1-\uffff_-]{0,62})?"
        r"[A-Za-z0-9\u00a1-\uffff]\.)+"
        f"(?:[a-z{lower}]{{2,63}}|xn--[a-z0-9]+)\\.?)"
        r"(?::\d{2,5})?(?:[/?#]\S*)?\Z"
    )
    return prefix, suffix, infix, url


# --------------------------------------------------------------------------- exception table


def _words(spaced: str) -> list[str]:
    return spaced.split()


_APOS = ("'", "’")
# Auxiliaries whose "n't" form splits off; the stem changes for can/will/shall/ain.
_NT_STEMS = _words(
    "ai are ca could dare did does do had has have is may might must need ought sha should was "
    "were wo would"
)
# Which clitics each word takes, as English uses them ("they're" but not "he're").
_PRONOUN_TAILS = {
    "i": ("'d", "'ll", "'ve", "'m", "'d've", "'ll've"),
    **{p: ("'d", "'ll", "'s", "'d've", "'ll've") for p in ("he", "she", "it")},
    **{p: ("'d", "'ll", "'re", "'ve", "'d've", "'ll've") for p in ("you", "we", "they")},
    **{p: ("'d", "'ll", "'s", "'d've", "'ll've") for p in ("that", "this")},
    **{p: ("'d", "'ll", "'re", "'ve", "'d've", "'ll've") for p in ("these", "those")},
    **{
        p: ("'d", "'ll", "'re", "'ve", "'s", "'d've", "'ll've")
        for p in ("there", "what", "when", "where", "who", "why", "how")
    },
}
# "n't've" exists only after the modal-like auxiliaries.
_NT_VE_STEMS = frozenset(
    _words("ca could did does do had may might must need ought sha should wo would")
)
# Apostrophe-less spellings that are ordinary words; they must not be split.
_NOT_CONTRACTIONS = frozenset(
    _words("ill well hell shed were its lets shell whore here is howdy cmon yall")
)
_ABBREVIATIONS = _words(
    "Mr. Mrs. Ms. Dr. St. Mt. Jr. Prof. Gen. Gov. Rep. Sen. Rev. Adm. Co. Corp. Inc. Ltd. "
    "Bros. co. e.g. i.e. E.g. I.e. E.G. I.E. a.m. p.m. Ph.D. vs. Jan. Feb. Mar. Apr. Jun. "
    "Jul. Aug. Sep. Sept. Oct. Nov. Dec. D.C. N.Y. Ala. Ariz. Ark. Calif. Colo. Conn. "
    "Del. Fla. Ga. Ill. Ind. Kan. Ky. La. Md. Mass. Mich. Minn. Miss. Mo. Mont. Neb. Nev. "
    "N.C. N.D. N.H. N.J. N.M. Okla. Ore. Pa. S.C. Tenn. Va. Wash. Wis. and/or C++ Ak. Ia. Id. "
    "Kans. Messrs. Nebr. v.s. w/o ä. ö. ü. em ll nuff ol ' ’ '' ’’ — 'em 'nuff 'bout 'cause 'cos "
    "'coz 'cuz 'Cause 'Cos 'Coz 'Cuz ’Cause ’Cos ’Coz ’Cuz 'd 'll 're 's 'S ’s ’S ‘s ‘S ’d ’ll "
    "’re ’em ’bout ’cause ’cos ’coz ’cuz ’nuff "
    "o'clock o’clock ma'am ma’am ol' ol’ doin doin' doin’ goin goin' goin’ havin havin' havin’ "
    "lovin lovin' lovin’ nothin nothin' nothin’ nuthin nuthin' nuthin’ somethin somethin' "
    "somethin’"
)
# Emoticons stay whole, otherwise their punctuation would split into prefix/suffix tokens.
_EMOTICONS = _words(
    ":) :-) :)) :-)) :))) :-))) :( :-( :(( :-(( :((( :-((( ): )-: (: (-: :] :-] [: [-: :[ =) "
    "(= =( =] ]= =[ [= =| =/ =3 =D :D :-D :P :-P :p :-p :o :-o :O :-O :x :-x :X :-X :* :-* :/ "
    ":-/ :| :-| :> :-> :} :-} :0 :-0 :1 :3 :-3 :() :o) ;) ;-) ;D ;-D ;_; (; (-; (-8 (o: 8) 8-) "
    "8D 8-D <3 <33 <333 </3 :'( :') :'-( :'-) :’( :’) :’-( :’-) >:( >:o XD XDD xD xDD ^_^ ^__^ "
    "^___^ -_- -__- o.o o.O O.o O.O o_o o_O O_o O_O 0.0 0.o o.0 0_0 0_o o_0 v.v V.V v_v V_V "
    "._. <.< >.> >.< @_@ ಠ_ಠ ಠ︵ಠ (*_*) (-_-) (._.) (>_<) (^_^) (¬_¬) (ಠ_ಠ) ¯\\(ツ)/¯"
)


def _variants(word: str) -> tuple[str, ...]:
    return (word, word[:1].upper() + word[1:])


@cache
def exceptions() -> dict[str, tuple[str, ...]]:
    """Chunk -> its tokens, for chunks the affix rules would split wrongly."""
    table: dict[str, tuple[str, ...]] = {}

    def add(pieces: list[str]) -> None:
        for apos in _APOS:
            parts = [p.replace("'", apos) for p in pieces]
            for first in _variants(parts[0]):
                table[first + "".join(parts[1:])] = (first, *parts[1:])
        # "dont" -> "do" "nt": spaCy splits the apostrophe-less spelling too.
        bare = [p.replace("'", "") for p in pieces]
        if "".join(bare).lower() not in _NOT_CONTRACTIONS:
            for first in _variants(bare[0]):
                table[first + "".join(bare[1:])] = (first, *bare[1:])

    for stem in _NT_STEMS:
        add([stem, "n't"])
        if stem in _NT_VE_STEMS:
            add([stem, "n't", "'ve"])
    for pronoun, tails in _PRONOUN_TAILS.items():
        for tail in tails:
            add([pronoun, *("'" + t for t in tail.split("'")[1:])])
    add(["let", "'s"])
    for modal in ("could", "might", "must", "should", "would"):
        add([modal, "'ve"])
    table["Cannot"] = ("Can", "not")
    table["cannot"] = ("can", "not")
    table["gonna"] = ("gon", "na")
    table["Gonna"] = ("Gon", "na")
    table["gotta"] = ("got", "ta")
    table["Gotta"] = ("Got", "ta")
    for hour in range(1, 13):
        for suffix in ("am", "pm", "a.m.", "p.m."):
            table[f"{hour}{suffix}"] = (str(hour), suffix)
    for pieces in (["y'", "all"], ["c'm", "on"], ["i", "'m", "a"], ["not", "'ve"]):
        add(pieces)
    add(["how", "'d", "'y"])
    for degree in "CFKcfk":
        table[f"°{degree}."] = ("°", degree, ".")
    for word in (*_ABBREVIATIONS, *_EMOTICONS):
        table.setdefault(word, (word,))
    for letter in "abcdefghijklmnopqrstuvwxyz":
        table[letter + "."] = (letter + ".",)
    return table


# --------------------------------------------------------------------------- tokenizer


@cache
def _mergeable() -> tuple[frozenset[str], int]:
    """Exception entries that contain punctuation, and the most tokens they can span: such an
    entry can also appear split into pieces by the affix rules ("f(x):" gives ")" ":")."""
    keys = frozenset(k for k in exceptions() if not k.isalnum())
    return keys, max(len(_raw_split(k)) for k in keys)


def _merge_exceptions(tokens: list[str]) -> list[str]:
    """Re-join adjacent pieces of one chunk that spell an exception (longest match first, then
    leftmost; overlapping matches lose), as the reference tokenizer's special-case pass does."""
    keys, longest = _mergeable()
    found: list[tuple[int, int]] = []
    for i in range(len(tokens) - 1):
        joined = tokens[i]
        for j in range(i + 1, min(len(tokens), i + longest)):
            joined += tokens[j]
            if joined in keys:
                found.append((i, j + 1))
    if not found:
        return tokens
    found.sort(key=lambda span: (span[0] - span[1], span[0]))
    taken = [False] * len(tokens)
    starts: dict[int, int] = {}
    for start, end in found:
        if not any(taken[start:end]):
            taken[start:end] = [True] * (end - start)
            starts[start] = end
    table = exceptions()
    out: list[str] = []
    i = 0
    while i < len(tokens):
        end = starts.get(i)
        if end is None:
            out.append(tokens[i])
            i += 1
        else:
            out.extend(table["".join(tokens[i:end])])
            i = end
    return out


def _split_chunk(chunk: str, out: list[str]) -> None:
    pieces = _raw_split(chunk)
    out.extend(_merge_exceptions(pieces) if len(pieces) > 1 else pieces)


def _raw_split(chunk: str) -> list[str]:
    """One whitespace-free chunk cut by the affix, exception, URL and infix rules."""
    out: list[str] = []
    prefix_re, suffix_re, infix_re, url_re = _patterns()
    table = exceptions()
    prefixes: list[str] = []
    suffixes: list[str] = []
    s = chunk
    last = -1
    while s and len(s) != last:
        if s in table:
            break
        last = len(s)
        m = prefix_re.match(s)
        pre = m.end() if m else 0
        if pre and s[pre:] in table:
            prefixes.append(s[:pre])
            s = s[pre:]
            break
        suf = _suffix_len(suffix_re, s[pre:])
        if suf and s[:-suf] in table:
            suffixes.append(s[-suf:])
            s = s[:-suf]
            break
        if pre and suf and pre + suf <= len(s):
            prefixes.append(s[:pre])
            suffixes.append(s[-suf:])
            s = s[pre:-suf]
        elif pre:
            prefixes.append(s[:pre])
            s = s[pre:]
        elif suf:
            suffixes.append(s[-suf:])
            s = s[:-suf]
    out.extend(prefixes)
    if s:
        special = table.get(s)
        if special is not None:
            out.extend(special)
        elif url_re.match(s):
            out.append(s)
        else:
            start = 0
            for m in infix_re.finditer(s):
                if m.start() == 0:
                    continue
                if m.start() != start:
                    out.append(s[start : m.start()])
                if m.end() != m.start():
                    out.append(m.group())
                start = m.end()
            if start < len(s):
                out.append(s[start:])
    out.extend(reversed(suffixes))
    return out


# Every suffix rule spans at most this many characters including what its lookbehind reads,
# except a run of dots, which `_suffix_len` extends.
_SUFFIX_WINDOW = 10
# Single trailing characters that always come off a word of letters as their own token.
_ALWAYS_SUFFIX = frozenset(",;:!?)]}\"”“'’»*&_#>")


def _suffix_len(suffix_re: re.Pattern[str], s: str) -> int:
    # Searching only the tail: an end-anchored search over the whole chunk would try every
    # start position, which made suffix search most of the tokenizer's time.
    window = s[-_SUFFIX_WINDOW:]
    m = suffix_re.search(window)
    if m is None:
        return 0
    if window.endswith("..") and window[m.start()] == ".":
        return len(s) - len(s.rstrip("."))
    return len(window) - m.start()


# Chunk -> its tokens, for chunks that take the affix/exception/infix path. The split depends
# on the chunk alone, and web text repeats such chunks ("(the", "U.S.", "2019,"): about 80% of
# the slow-path chunks of the shipped web pages were seen before in the same corpus. Cleared
# when full, which bounds its memory (~50 MB) at no cost to correctness.
_CHUNK_MEMO: dict[str, tuple[str, ...]] = {}
_CHUNK_MEMO_MAX = 1 << 18


def word_tokens(text: str) -> list[str]:
    """The words of `text` as datatrove's English word tokenizer counts them (punctuation split
    off as its own tokens, whitespace dropped)."""
    table = exceptions()
    memo = _CHUNK_MEMO
    out: list[str] = []
    append = out.append
    extend = out.extend
    for chunk in text.split():
        # Fast path: a word of letters only (or digits only) is one token unless it is a
        # contraction; letters mixed with digits can carry a unit suffix ("10km").
        if (chunk.isalpha() or chunk.isdigit()) and chunk not in table:
            append(chunk)
            continue
        # Second fast path: letters plus one trailing mark ("word," "end."), the next most
        # common shape; the mark splits off exactly as the affix loop would split it.
        last = chunk[-1]
        stem = chunk[:-1]
        if (
            stem.isalpha()
            and chunk not in table
            and stem not in table
            and (last in _ALWAYS_SUFFIX or (last == "." and stem[-1].islower()))
        ):
            append(stem)
            append(last)
        else:
            pieces = memo.get(chunk)
            if pieces is None:
                split: list[str] = []
                _split_chunk(chunk, split)
                if len(memo) >= _CHUNK_MEMO_MAX:
                    memo.clear()
                pieces = memo[chunk] = tuple(split)
            extend(pieces)
    return out


def is_punct(token: str) -> bool:
    """True when every character is Unicode punctuation (category P*), as spaCy's is_punct."""
    return all(unicodedata.category(c)[0] == "P" for c in token)


def count_sentences(text: str) -> int:
    """Sentences in `text` as a punctuation-based sentence splitter counts them: a new sentence
    starts at the first non-punctuation token after a sentence-final mark ("." "!" "?" ...)."""
    tokens = word_tokens(text)
    if not tokens:
        return 0
    count = 1
    seen_end = False
    for token in tokens:
        if token in SENTENCE_END:
            seen_end = True
        elif seen_end and not is_punct(token):
            count += 1
            seen_end = False
    return count
