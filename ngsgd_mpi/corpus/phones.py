"""espeak-ng phoneme mnemonics -> ARPAbet 39 (+ ``sil``): the documented phone map.

Target set: the 39 phones of the CMU Pronouncing Dictionary without stress
marks, plus ``sil`` (class 0), so phone labels have 40 classes::

    sil AA AE AH AO AW AY B CH D DH EH ER EY F G HH IH IY JH K L M N NG
    OW OY P R S SH T TH UH UW V W Y Z ZH

Principle: a label names the sound espeak actually produced, with the nearest
CMU phone(s).  espeak reports a phoneme *after* its accent rules ran (an
en-029 speaker's "think" arrives as ``t[``, not ``T``), so labels follow the
accent, as real forced alignments do with accent-specific lexicons.

* One espeak phoneme may map to two ARPAbet phones (e.g. en-us ``e@`` "air" =
  EH R, ``aI@`` "science" = AY AH); its time span is then split equally.
* r-coloured vowels depend on rhoticity: in the rhotic accents (American,
  Scottish) ``e@ A@ i@3 U@ o@ O@ aI3 aU@ 3`` carry an R/ER, in the
  non-rhotic ones (British, Caribbean) the centring offglide stays part of the
  vowel (``e@`` = EH).  See :data:`RHOTIC_OVERRIDES`.
* When a mapped phone list ends in R/ER and the next espeak phoneme is an r
  (espeak appends explicit ``r`` in some accents), the trailing R/ER is dropped
  so the r is not labelled twice (:func:`map_phonemes`).
* Syllabic consonants follow the CMU dictionary: ``@L`` = AH L, ``n-`` = AH N.
* Flaps and glottal stops are allophones of /t/: ``t#``, ``?`` = T.
* Pauses (``_``, ``_:``, ``_!``, ``_|``, ...) are ``sil``.

A mnemonic missing from the table raises :class:`UnknownPhonemeError`; the
recipe skips that utterance and reports the mnemonic (never a silent drop).
"""

from __future__ import annotations

PHONES = ("sil", "AA", "AE", "AH", "AO", "AW", "AY", "B", "CH", "D", "DH", "EH", "ER", "EY", "F",
          "G", "HH", "IH", "IY", "JH", "K", "L", "M", "N", "NG", "OW", "OY", "P", "R", "S", "SH",
          "T", "TH", "UH", "UW", "V", "W", "Y", "Z", "ZH")
PHONE_INDEX = {name: i for i, name in enumerate(PHONES)}
SILENCE = 0

#: espeak-ng English accents (voice language codes) -> language file under espeak-ng-data/lang.
ACCENTS = {
    "en-us": "gmw/en-US",              # General American
    "en-us-nyc": "gmw/en-US-nyc",      # New York City
    "en-gb": "gmw/en",                 # British (southern)
    "en-gb-x-rp": "gmw/en-GB-x-rp",    # Received Pronunciation
    "en-gb-x-gbclan": "gmw/en-GB-x-gbclan",  # Lancaster
    "en-gb-x-gbcwmd": "gmw/en-GB-x-gbcwmd",  # West Midlands
    "en-gb-scotland": "gmw/en-GB-scotland",  # Scottish
    "en-029": "gmw/en-029",            # Caribbean
}
RHOTIC_ACCENTS = frozenset({"en-us", "en-us-nyc", "en-gb-scotland"})

PAUSES = frozenset({"_", "_:", "_::", "_!", "_|", "_;_", "_^_", "_X1", "||"})

#: Non-rhotic (British) reading of every English espeak phoneme.
ESPEAK_TO_ARPABET: dict[str, tuple[str, ...]] = {
    # --- vowels -----------------------------------------------------------
    "@": ("AH",), "@2": ("AH",), "@5": ("AH",), "@-": ("AH",), "@#": ("AH",),  # schwa variants
    "3": ("AH",),        # British "lett-er" schwa (en-us: ER, see overrides)
    "3:": ("ER",),       # "nurse"
    "VR": ("ER",), "IR": ("ER",),   # Scottish split NURSE vowels ("word", "girl")
    "a": ("AE",), "a2": ("AE",), "a/": ("AE",), "A#": ("AE",),   # "trap"
    "aa": ("AA",),       # British "bath" (en-us: AE)
    "a#": ("AH",), "a#2": ("AH",),  # "about"
    "A:": ("AA",), "A@": ("AA",),   # "palm", "start"
    "0": ("AA",), "02": ("AH",),    # "lot" (CMU: AA), "what"
    "O": ("AO",), "O:": ("AO",), "O2": ("AO",), "O@": ("AO",), "o@": ("AO",),  # "thought", "north"
    "V": ("AH",),        # "strut"
    "E": ("EH",), "E2": ("EH",), "E#": ("EH",), "e#": ("EH",), "e": ("EH",),  # "dress"
    "e@": ("EH",),       # "square"
    "e:": ("EY",), "eI": ("EY",),   # "face"
    "I": ("IH",), "I2": ("IH",), "I#": ("IH",), "I2#": ("IH",), "i@3": ("IH",),  # "kit", "near"
    "i": ("IY",), "i:": ("IY",),    # "happy", "fleece"
    "i@": ("IY", "AH"),  # "idea"
    "U": ("UH",), "U@": ("UH",),    # "foot", "cure"
    "u": ("UW",), "u:": ("UW",),    # "goose"
    "oU": ("OW",), "oU#": ("OW",), "o:": ("OW",), "o": ("OW",),  # "goat"
    "aI": ("AY",), "aI2": ("AY",),  # "price"
    "aI@": ("AY", "AH"), "aI3": ("AY", "AH"),  # "science", "fire"
    "aU": ("AW",), "aU@": ("AW", "AH"),  # "mouth", "hour"
    "OI": ("OY",),       # "choice"
    "@L": ("AH", "L"),   # syllabic l, "bottle"
    "A~": ("AA", "N"), "O~": ("AO", "N"),  # French nasal vowels in loanwords
    # --- consonants -------------------------------------------------------
    "p": ("P",), "b": ("B",), "t": ("T",), "t2": ("T",), "t#": ("T",), "t[": ("T",), "?": ("T",),
    "d": ("D",), "d#": ("D",), "d[": ("D",), "*": ("D",), "k": ("K",), "g": ("G",), "g-": ("G",),
    "f": ("F",), "v": ("V",), "T": ("TH",), "D": ("DH",), "s": ("S",), "z": ("Z",), "z#": ("Z",),
    "z/2": ("Z",), "S": ("SH",), "Z": ("ZH",), "h": ("HH",), "x": ("K",),   # "loch" (CMU: K)
    "tS": ("CH",), "dZ": ("JH",),
    "m": ("M",), "n": ("N",), "N": ("NG",), "n-": ("AH", "N"), "m-": ("AH", "M"), "n^": ("N",),
    "l": ("L",), "l/": ("L",), "l/2": ("L",), "l^": ("L",),
    "l#": ("L",),        # Welsh voiceless "ll" in loanwords ("llano"; CMU: L)
    "r": ("R",), "r-": ("R",), "r/": ("R",), "R": ("R",),
    "w": ("W",), "w#": ("W",), "W": ("W",),  # "which" (Scottish voiceless w)
    "j": ("Y",), ";": ("Y",),        # ";" = linking j between vowels
}
ESPEAK_TO_ARPABET.update({p: ("sil",) for p in PAUSES})

#: Readings that differ in the rhotic accents (r-coloured vowels, American "bath").
RHOTIC_OVERRIDES: dict[str, tuple[str, ...]] = {
    "3": ("ER",),
    "aa": ("AE",),
    "e@": ("EH", "R"), "A@": ("AA", "R"), "i@3": ("IH", "R"), "U@": ("UH", "R"),
    "o@": ("AO", "R"), "O@": ("AO", "R"), "aI3": ("AY", "ER"), "aU@": ("AW", "ER"),
}

_R_LIKE = ("R", "ER")


class UnknownPhonemeError(ValueError):
    """espeak emitted a mnemonic the phone map does not cover."""

    def __init__(self, mnemonics):
        self.mnemonics = sorted(set(mnemonics))
        super().__init__(f"espeak phoneme(s) not in the phone map: {' '.join(self.mnemonics)}")


def phone_table(accent: str) -> dict[str, tuple[str, ...]]:
    """The mnemonic -> ARPAbet table for one accent."""
    if accent not in ACCENTS:
        raise ValueError(f"accent must be one of {', '.join(ACCENTS)}, got {accent!r}")
    table = dict(ESPEAK_TO_ARPABET)
    if accent in RHOTIC_ACCENTS:
        table.update(RHOTIC_OVERRIDES)
    return table


def map_phonemes(mnemonics, accent: str) -> list[tuple[str, ...]]:
    """ARPAbet phones for each espeak mnemonic of one utterance (same length as the input).

    Raises UnknownPhonemeError listing every unmapped mnemonic.
    """
    table = phone_table(accent)
    unknown = [m for m in mnemonics if m not in table]
    if unknown:
        raise UnknownPhonemeError(unknown)
    mapped = [table[m] for m in mnemonics]
    for i in range(len(mapped) - 1):
        # espeak sometimes appends an explicit r after an r-coloured vowel: label the r once.
        if len(mapped[i]) > 1 and mapped[i][-1] in _R_LIKE and mapped[i + 1][0] == "R":
            mapped[i] = mapped[i][:-1]
    return mapped
