"""CLIP byte-level BPE tokenizer for the runtime, standard library only.

The Mac runtime must turn a prompt into the 77 token ids the Core ML text encoder expects without
importing transformers, tokenizers, torch or ftfy. This module reproduces, id for id, what
``transformers.CLIPTokenizer`` (transformers 5.x, backed by the ``tokenizers`` library, the class
diffusers' pipelines use) produces from the same ``vocab.json`` and ``merges.txt``:

1. **Special tokens are cut out of the raw prompt first**, before any normalisation: the exact
   strings ``<|startoftext|>``, ``<|endoftext|>`` and the padding token. With SD 2.x's pad token
   ``!`` this means every ``!`` in a prompt becomes the lone id 0 and never merges with its
   neighbours (``"wow!!"`` -> ``wow``, ``!``, ``!``), which is what the reference does.
2. **Normalisation** of the remaining text: Unicode NFC, then every run of Unicode ``White_Space``
   characters becomes one space, then lowercasing code point by code point (no Greek final-sigma
   rule). No stripping of accents, no ftfy, no HTML unescaping.
3. **Pre-tokenisation** into words: the contractions ``'s 't 're 've 'm 'll 'd``, runs of
   letters (``\\p{L}``), single digits (``\\p{N}``), and runs of anything else that is not
   whitespace; whitespace is dropped. A lowercased special-token spelling such as
   ``<|ENDOFTEXT|>`` is one word here and then split as ``<|``, ``endoftext``, ``|>``.
4. **Byte-level BPE**: each word's UTF-8 bytes are mapped to CLIP's byte symbols, ``</w>`` is
   attached to the last symbol, and merges are applied lowest rank first.
5. **Framing**: start token, the first 75 prompt tokens, end token, padding to 77 ids.

``encode(prompt)`` returns just the 77 ids. ``tokenize(prompt)`` returns ``Tokens(ids,
truncated)``: ``truncated`` is the decoded text of the prompt tokens that did not fit ("" when
nothing was cut), the text diffusers' pipelines name in their truncation warning, so a caller can
tell the user what the model will not see.

Character classes, NFC and lowercasing come from the running Python's Unicode database. Only code
points assigned in a newer Unicode version than that database knows can come out differently from
the reference (under Python 3.11, Unicode 14, that is about 9,400 rarely used code points from
Unicode 15-16); every code point assigned in Unicode 14 was checked against the reference.
"""

from __future__ import annotations

import functools
import heapq
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from ..families import END_OF_TEXT

__all__ = ["BOS_TOKEN", "END_OF_WORD", "EOS_TOKEN", "CLIPTokenizer", "Tokens", "byte_symbols", "normalize_text", "split_words"]

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = END_OF_TEXT  # also SD 1.x's pad token, which the family description names
END_OF_WORD = "</w>"
CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")  # what may follow an apostrophe as one word

# Unicode's White_Space property (stable since Unicode 6.3). The reference's regex engine uses it
# for \s. Python's str.isspace() and re's \s additionally accept U+001C..U+001F, which the
# reference treats as ordinary symbols, so the set is spelled out instead of derived.
WHITESPACE = (
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_WHITESPACE_SET = frozenset(WHITESPACE)
_WHITESPACE_RUN = re.compile("[" + re.escape(WHITESPACE) + "]+")

# Character classes used by the word splitter.
_SPACE, _LETTER, _NUMBER, _OTHER = range(4)


@dataclass(frozen=True)
class Tokens:
    """The encoder input for one prompt.

    ``ids`` has exactly ``max_length`` entries: start token, prompt tokens, end token, padding.
    ``truncated`` is the decoded text of the prompt tokens that did not fit ("" if none), for
    warning the user the way diffusers does.
    """

    ids: list[int]
    truncated: str = ""


def byte_symbols() -> dict[int, str]:
    """Map each byte to its printable stand-in character in CLIP's byte-level alphabet.

    Bytes that are printable, non-space Latin-1 characters represent themselves; the other 68
    bytes are assigned code points 256, 257, ... in increasing byte order.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted = sorted(set(range(256)) - set(printable))
    symbols = {b: chr(b) for b in printable}
    symbols.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return symbols


_BYTE_TO_SYMBOL = byte_symbols()
_SYMBOL_TO_BYTE = {symbol: b for b, symbol in _BYTE_TO_SYMBOL.items()}
# Decoding UTF-8 bytes as Latin-1 gives one character per byte with code point == byte value,
# so str.translate can then map bytes to symbols in one C-level pass.
_LATIN1_TO_SYMBOL = str.maketrans({chr(b): symbol for b, symbol in _BYTE_TO_SYMBOL.items()})


def normalize_text(text: str) -> str:
    """Apply the reference normaliser: NFC, whitespace runs -> one space, per-code-point lowercase.

    Python's ``str.lower`` applies one context rule, turning a word-final capital sigma into
    ``ς``; the reference maps every ``Σ`` to ``σ``, so it is replaced before lowercasing.
    """
    text = unicodedata.normalize("NFC", text)
    text = _WHITESPACE_RUN.sub(" ", text)
    return text.replace("Σ", "σ").lower()


@functools.lru_cache(maxsize=1 << 16)
def _char_class(ch: str) -> int:
    """Classify one character as whitespace, letter (\\p{L}), number (\\p{N}) or other."""
    if ch in _WHITESPACE_SET:
        return _SPACE
    major = unicodedata.category(ch)[0]
    if major == "L":
        return _LETTER
    if major == "N":
        return _NUMBER
    return _OTHER


def _special_spelling_at(text: str, i: int) -> str | None:
    """Return ``<|startoftext|>`` or ``<|endoftext|>`` if it starts at ``text[i]``."""
    for special in (BOS_TOKEN, EOS_TOKEN):
        if text.startswith(special, i):
            return special
    return None


def _contraction_at(text: str, i: int) -> str | None:
    """Return the contraction (``'s``, ``'ll``, ...) starting at ``text[i] == "'"``, if any."""
    for suffix in CONTRACTIONS:
        if text.startswith(suffix, i + 1):
            return "'" + suffix
    return None


def _run_end(text: str, i: int, cls: int) -> int:
    """Return the end of the run of characters of class ``cls`` starting at ``i``."""
    n = len(text)
    while i < n and _char_class(text[i]) == cls:
        i += 1
    return i


def split_words(text: str) -> list[str]:
    """Split normalised text into the words that BPE is applied to, dropping whitespace.

    Mirrors a leftmost-first regex alternation: at each position the special-token spellings win,
    then contractions, then a letter run, a single digit, or a run of other symbols. Runs are
    greedy, so a symbol run swallows an apostrophe even if a contraction follows (``!'s`` ->
    ``!'``, ``s``).
    """
    words: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "<" and (special := _special_spelling_at(text, i)):
            # The reference's byte-level stage re-splits such a word by character class.
            words += ["<|", special[2:-2], "|>"]
            i += len(special)
            continue
        if ch == "'" and (contraction := _contraction_at(text, i)):
            words.append(contraction)
            i += len(contraction)
            continue
        cls = _char_class(ch)
        if cls == _SPACE:
            i += 1
            continue
        end = i + 1 if cls == _NUMBER else _run_end(text, i, cls)
        words.append(text[i:end])
        i = end
    return words


def _to_symbols(word: str) -> str:
    """Spell a word's UTF-8 bytes in CLIP's byte alphabet."""
    return word.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_SYMBOL)


def _load_merges(path: Path) -> list[tuple[str, str]]:
    """Read ``merges.txt``: an optional ``#version`` header, then one ``left right`` pair a line."""
    # splitlines() also accepts CRLF files; no byte symbol is a line boundary character.
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = []
    for line in lines:
        if not line:
            continue
        left, sep, right = line.partition(" ")
        if not sep:
            raise ValueError(f"{path}: malformed merge rule {line!r}")
        merges.append((left, right))
    return merges


class CLIPTokenizer:
    """Encode prompts into fixed-length CLIP token ids, and decode ids back to text.

    Build it with :meth:`from_files`. SD 1.x pads with ``<|endoftext|>`` (the default); SD 2.x
    pads with ``!``. :meth:`tokenize` reports truncation (``Tokens.truncated``); :meth:`encode`
    returns the ids alone.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        pad_token: str = EOS_TOKEN,
        max_length: int = 77,
        cache_size: int = 1 << 14,
    ) -> None:
        for name, token in (("start", BOS_TOKEN), ("end", EOS_TOKEN), ("pad", pad_token)):
            if token not in vocab:
                raise ValueError(f"{name} token {token!r} is not in the vocabulary")
        if max_length < 2:
            raise ValueError(f"max_length must fit the start and end tokens, got {max_length}")
        self.vocab = vocab
        self.max_length = max_length
        self.pad_token = pad_token
        self.bos_id, self.eos_id = vocab[BOS_TOKEN], vocab[EOS_TOKEN]
        self.pad_id = vocab[pad_token]
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._id_to_token = {i: token for token, i in vocab.items()}
        # The reference cuts all special tokens (including the pad token) out of the raw text
        # before normalising; longest first so that no special token shadows a longer one.
        specials = sorted({BOS_TOKEN, EOS_TOKEN, pad_token}, key=len, reverse=True)
        self._special_ids = {token: vocab[token] for token in specials}
        self._special_split = re.compile("(" + "|".join(map(re.escape, specials)) + ")")
        # Prompts reuse a small set of words; caching per word makes repeat encodes cheap.
        self._word_ids = functools.lru_cache(maxsize=cache_size)(self._bpe)

    @classmethod
    def from_files(
        cls,
        vocab_json: str | Path,
        merges_txt: str | Path,
        pad_token: str = EOS_TOKEN,
        max_length: int = 77,
    ) -> CLIPTokenizer:
        """Load the tokenizer from a Hugging Face style ``vocab.json`` and ``merges.txt``."""
        with open(vocab_json, encoding="utf-8") as f:
            vocab = json.load(f)
        merges = _load_merges(Path(merges_txt))
        return cls(vocab, merges, pad_token=pad_token, max_length=max_length)

    # -- encoding ---------------------------------------------------------------------------

    def tokenize(self, prompt: str) -> Tokens:
        """Return the padded, truncated ids for ``prompt`` and the text cut off, if any."""
        content = self.prompt_ids(prompt)
        room = self.max_length - 2
        kept, cut = content[:room], content[room:]
        ids = [self.bos_id, *kept, self.eos_id]
        ids += [self.pad_id] * (self.max_length - len(ids))
        return Tokens(ids=ids, truncated=self.decode(cut) if cut else "")

    def encode(self, prompt: str) -> list[int]:
        """Return just the ``max_length`` ids for ``prompt``."""
        return self.tokenize(prompt).ids

    def prompt_ids(self, prompt: str) -> list[int]:
        """Return the ids of the prompt's own tokens: no start/end tokens, no truncation."""
        ids: list[int] = []
        for segment in self._special_split.split(prompt):
            if segment in self._special_ids:
                ids.append(self._special_ids[segment])
            elif segment:
                for word in split_words(normalize_text(segment)):
                    ids.extend(self._word_ids(_to_symbols(word)))
        return ids

    def _bpe(self, symbols: str) -> tuple[int, ...]:
        """Apply the merges to one word (already in byte symbols); return its token ids.

        The reference's merge loop: a queue of adjacent pairs ordered by (rank, position); the
        lowest-ranked, leftmost pair that is still adjacent merges, and its new neighbours join
        the queue. For a learned merge list (no merge ranks before the merges that build its two
        halves, true of CLIP's) this equals "merge every occurrence of the lowest-ranked pair,
        left to right, until none is left", in O(n log n) for an n-symbol word instead of
        O(n^2): a single 20,000-letter word, which has to be split in full (``Tokens.truncated``
        reports all of it), takes about 0.1 s instead of 10 s.
        """
        parts = [*symbols[:-1], symbols[-1] + END_OF_WORD]  # parts[i] == "": merged into a left neighbour
        n = len(parts)
        if n == 1:
            return (self.vocab[parts[0]],)
        ranks = self._ranks
        nxt = list(range(1, n + 1))  # linked list over the surviving parts; n ends it
        prv = list(range(-1, n - 1))
        queue = [(ranks[pair], i) for i, pair in enumerate(zip(parts, parts[1:])) if pair in ranks]
        heapq.heapify(queue)
        while queue:
            rank, i = heapq.heappop(queue)
            j = nxt[i]
            # Stale entry: i was merged away, or its right neighbour changed since it was queued.
            if not parts[i] or j == n or ranks.get((parts[i], parts[j])) != rank:
                continue
            parts[i] += parts[j]
            parts[j] = ""
            nxt[i] = k = nxt[j]
            if k < n:
                prv[k] = i
            h = prv[i]
            if h >= 0 and (r := ranks.get((parts[h], parts[i]))) is not None:
                heapq.heappush(queue, (r, h))
            if k < n and (r := ranks.get((parts[i], parts[k]))) is not None:
                heapq.heappush(queue, (r, i))
        return tuple(self.vocab[part] for part in parts if part)

    # -- decoding ---------------------------------------------------------------------------

    def decode(self, ids: list[int]) -> str:
        """Turn ids back into text: words separated by spaces, special tokens spelled out.

        Matches the reference decoder: byte symbols become bytes, invalid UTF-8 becomes U+FFFD,
        each ``</w>`` becomes a space, and surrounding whitespace is stripped.
        """
        try:
            symbols = "".join([self._id_to_token[i] for i in ids])
        except KeyError as e:
            raise ValueError(f"token id {e.args[0]} is not in the vocabulary") from None
        # Every vocabulary token is spelled in the byte alphabet (special tokens use printable
        # ASCII, which stands for itself), so each character maps back to exactly one byte.
        data = bytes([_SYMBOL_TO_BYTE[ch] for ch in symbols])
        text = data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")
        # Python's strip(), not the White_Space set: the reference strips in Python code too.
        return text.strip()
