"""The runtime CLIP tokenizer must give the ids of transformers' CLIPTokenizer (diffusers' choice).

The reference is ``transformers.CLIPTokenizer`` loaded from the same two files; the vocabulary
files themselves are built by ``coreml_sd.testing.clip_vocab`` and checked against facts known
from the Hugging Face CLIP repositories.
"""

from __future__ import annotations

import importlib.metadata
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from coreml_sd.runtime import tokenizer as rt
from coreml_sd.runtime.tokenizer import CLIPTokenizer, Tokens, normalize_text, split_words
from coreml_sd.testing import clip_vocab

BOS, EOS = 49406, 49407
MAX_LENGTH = 77
PADS = {"sd1": "<|endoftext|>", "sd2": "!"}
PAD_IDS = {"<|endoftext|>": EOS, "!": 0}


# -- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(clip_vocab_dir: Path) -> tuple[Path, Path]:
    return clip_vocab_dir / "vocab.json", clip_vocab_dir / "merges.txt"


@pytest.fixture(scope="module", params=list(PADS.values()), ids=list(PADS))
def pad_token(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def ours(files: tuple[Path, Path], pad_token: str) -> CLIPTokenizer:
    return CLIPTokenizer.from_files(*files, pad_token=pad_token)


_REFERENCES: dict[tuple[Path, str], object] = {}


@pytest.fixture(scope="module")
def reference(clip_vocab_dir: Path, pad_token: str):
    """``transformers.CLIPTokenizer`` from the same files, loaded once per pad token (~0.5 s)."""
    key = (clip_vocab_dir, pad_token)
    if key not in _REFERENCES:
        _REFERENCES[key] = transformers.CLIPTokenizer.from_pretrained(
            clip_vocab_dir, pad_token=pad_token
        )
    return _REFERENCES[key]


def reference_tokens(ref, prompt: str) -> Tokens:
    """What a diffusers pipeline computes: padded/truncated ids, and the decoded cut-off text."""
    ids = ref(prompt, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    full = ref(prompt).input_ids
    # diffusers decodes untruncated_ids[:, max_length - 1 : -1] for its truncation warning.
    truncated = ref.batch_decode([full[MAX_LENGTH - 1 : -1]])[0] if len(full) > MAX_LENGTH else ""
    return Tokens(ids=ids, truncated=truncated)


# -- vocabulary files ---------------------------------------------------------------------------


def test_find_clip_bpe_locates_open_clip_file() -> None:
    path = clip_vocab.find_clip_bpe()
    assert path.name == "bpe_simple_vocab_16e6.txt.gz"
    assert path.is_file()


def test_find_clip_bpe_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(clip_vocab.importlib.metadata, "files", not_installed)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps open_clip_torch"):
        clip_vocab.find_clip_bpe()


@pytest.fixture(scope="module")
def vocab(files: tuple[Path, Path]) -> dict[str, int]:
    return json.loads(files[0].read_text(encoding="utf-8"))


def test_vocab_has_49408_contiguous_ids(vocab: dict[str, int]) -> None:
    assert len(vocab) == 49408
    assert sorted(vocab.values()) == list(range(49408))
    # Written in id order, like the Hugging Face file.
    assert list(vocab.values()) == list(range(49408))


@pytest.mark.parametrize(
    ("token", "token_id"),
    [
        ("!", 0),  # first printable byte
        ("a", 64),
        ("Ā", 188),  # byte 0, the first shifted (non-printable) byte
        ("Ġ", 220),  # the space byte
        ("!</w>", 256),
        ("in", 512),  # first merge
        ("th", 513),
        ("a</w>", 320),
        ("of</w>", 539),
        ("photo</w>", 1125),
        ("cat</w>", 2368),
        ("jekyll</w>", 49405),  # last merge
        ("<|startoftext|>", BOS),
        ("<|endoftext|>", EOS),
    ],
)
def test_known_ids(vocab: dict[str, int], token: str, token_id: int) -> None:
    assert vocab[token] == token_id


def test_byte_alphabet_layout(vocab: dict[str, int]) -> None:
    symbols = clip_vocab.byte_symbols()
    assert sorted(symbols) == list(range(256))
    assert len(set(symbols.values())) == 256
    tokens = list(vocab)
    assert tokens[:256] == list(symbols.values())
    assert tokens[256:512] == [s + "</w>" for s in symbols.values()]
    # The vocabulary builder and the runtime's tokenizer share one byte table, not two copies.
    assert clip_vocab.byte_symbols is rt.byte_symbols


def test_merges_file(files: tuple[Path, Path], vocab: dict[str, int]) -> None:
    lines = files[1].read_text(encoding="utf-8").split("\n")
    assert lines[0] == "#version: 0.2"
    assert lines[-1] == ""  # newline-terminated
    rules = lines[1:-1]
    assert len(rules) == clip_vocab.NUM_MERGES == 48894
    assert rules[:3] == ["i n", "t h", "a n"]
    assert rules[-1] == "jeky ll</w>"
    # Merge k produces the token with id 512 + k.
    assert all(vocab[rule.replace(" ", "")] == 512 + k for k, rule in enumerate(rules))


def test_read_merges_rejects_short_file(tmp_path: Path) -> None:
    import gzip

    bad = tmp_path / "bpe.txt.gz"
    with gzip.open(bad, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(ValueError, match="2 merge rules"):
        clip_vocab.read_merges(bad)


def test_vocab_round_trips_through_transformers(
    clip_vocab_dir: Path, vocab: dict[str, int]
) -> None:
    ref = transformers.CLIPTokenizer.from_pretrained(clip_vocab_dir)
    assert ref.get_vocab() == vocab
    assert ref("a photo of a cat").input_ids == [BOS, 320, 1125, 539, 320, 2368, EOS]


# -- tokenizer: fixed prompt set --------------------------------------------------------------

PROMPTS = [
    "a photo of a cat",
    "A PHOTO OF A CAT, Trending On ArtStation",
    "Hello, world! How's it going?",
    "it's they're we've I'm you'll he'd don't can't",
    "IT'S THEY'RE WE'VE I'M YOU'LL HE'D",
    "'s 't 're at the start, and rock'n'roll, and '' quotes ''",
    "ellipsis... dash—em – en; semi: colon!? ¿qué? ¡sí!",
    "(masterpiece:1.2), [bad hands], {braces} <angle> | pipe \\ backslash / slash",
    "1234567890 3.14159 1,000,000 2024-01-01 12:30 #42 $9.99 50% 1e-5",
    "00000000000000000000000000000000000000 long digit run",
    "8k uhd 1080p 4K 16:9 x2",
    "café crème brûlée, résumé, naïve",
    "Über Müller straße STRASSE ẞ",
    "niño mañana señor Ñandú",
    "ÀÉÎÕÜ àéîõü",
    "e\u0301 combining accent vs é, A\u030a vs Å",
    "中文提示：一只可爱的猫，高清",
    "日本語のプロンプト、猫がいる。カタカナ ｶﾀｶﾅ",
    "Привет, мир! ЁЛКА ёлка",
    "مرحبا بالعالم، قطة",
    "שלום עולם",
    "한국어 고양이 사진",
    "ΟΔΟΣ ΣΟΦΙΑΣ Σ",
    "İstanbul ıi IJ ǅ",
    "🐈 cat 🐈‍⬛ black cat",
    "👩🏽‍🚀 astronaut, 👨‍👩‍👧‍👦 family",
    "👍🏻👍🏿 👋🏼",
    "🏳️‍🌈 🇫🇷🇯🇵 ❤️ ♥ ★",
    "   leading spaces",
    "trailing spaces   ",
    "multiple     spaces   between",
    "tabs\tand\nnewlines\r\nmixed\x0bvertical\x0cfeed",
    "\u00a0nbsp\u3000ideographic\u2003em\u2028line\u2029para\x85nel",
    "fullwidth ＡＢＣ １２３ ！",
    "ligature ﬁ ﬂ ﬀ",
    "curly ‘quotes’ “double” it’s",
    "&amp; &lt;html&gt; &#39;",
    "<|startoftext|>inline special<|endoftext|>text",
    "<|ENDOFTEXT|> upper-case special, <|endoftext|>!! and !<|endoftext|>",
    "!!!wow!!! ?! hello!",
    "x\x1cy\x1fz information separators",
    "zero\u200bwidth\u200djoiner\ufeffbom\u00adshy",
    "\x00 nul \x7f del \ufffd replacement",
    "superscript² ½ Ⅻ ٣ ३ 〇 一二三",
    "a",
    "",
    " ",
    "\n\t ",
]


@pytest.mark.parametrize("prompt", PROMPTS, ids=[f"p{i}" for i in range(len(PROMPTS))])
def test_matches_reference(ours: CLIPTokenizer, reference, prompt: str) -> None:
    assert ours.tokenize(prompt) == reference_tokens(reference, prompt)


@pytest.mark.parametrize("prompt", PROMPTS, ids=[f"p{i}" for i in range(len(PROMPTS))])
def test_normalisation_matches_reference(reference, prompt: str) -> None:
    assert normalize_text(prompt) == reference.backend_tokenizer.normalizer.normalize_str(prompt)


def test_decode_matches_reference(ours: CLIPTokenizer, reference) -> None:
    for prompt in PROMPTS:
        ids = ours.prompt_ids(prompt)
        assert ours.decode(ids) == reference.decode(ids), prompt
    full = ours.encode("a photo of a cat")
    assert ours.decode(full) == reference.decode(full)


# -- tokenizer: specific behaviour --------------------------------------------------------------


def test_known_prompt_ids(files: tuple[Path, Path]) -> None:
    tok = CLIPTokenizer.from_files(*files)
    assert tok.encode("a photo of a cat") == [BOS, 320, 1125, 539, 320, 2368] + [EOS] * 71
    # Case and surrounding whitespace do not matter.
    assert tok.encode("  A Photo\tOF a\nCAT ") == tok.encode("a photo of a cat")


@pytest.mark.parametrize("pad", list(PADS.values()), ids=list(PADS))
def test_empty_prompt(files: tuple[Path, Path], pad: str) -> None:
    tokens = CLIPTokenizer.from_files(*files, pad_token=pad).tokenize("")
    assert tokens == Tokens(ids=[BOS, EOS] + [PAD_IDS[pad]] * 75, truncated="")


def test_padding_conventions(files: tuple[Path, Path]) -> None:
    sd1 = CLIPTokenizer.from_files(*files).encode("cat")
    sd2 = CLIPTokenizer.from_files(*files, pad_token="!").encode("cat")
    assert sd1 == [BOS, 2368, EOS] + [EOS] * 74
    assert sd2 == [BOS, 2368, EOS] + [0] * 74


def test_sd2_pad_token_is_split_out_like_the_reference(files: tuple[Path, Path]) -> None:
    # With "!" registered as the pad (special) token, the reference never merges it: "wow!!" is
    # wow + ! + !, not wow + "!!</w>" as with the SD 1.x convention.
    assert CLIPTokenizer.from_files(*files).prompt_ids("wow!!") == [2781, 748]
    assert CLIPTokenizer.from_files(*files, pad_token="!").prompt_ids("wow!!") == [2781, 0, 0]


def test_unknown_pad_token_is_rejected(files: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match="pad token"):
        CLIPTokenizer.from_files(*files, pad_token="<pad>")


def test_custom_max_length(files: tuple[Path, Path]) -> None:
    tokens = CLIPTokenizer.from_files(*files, max_length=5).tokenize("a photo of a cat")
    assert tokens == Tokens(ids=[BOS, 320, 1125, 539, EOS], truncated="a cat")
    with pytest.raises(ValueError):
        CLIPTokenizer.from_files(*files, max_length=1)


def test_normalisation_facts() -> None:
    assert normalize_text("ΟΔΟΣ") == "οδοσ"  # no final-sigma rule
    assert normalize_text("e\u0301") == "é"  # NFC composes
    assert normalize_text("Café") == "café"  # accents kept
    assert normalize_text(" a \t\n b  ") == " a b "  # runs collapse, no strip
    assert normalize_text("x\x1cy") == "x\x1cy"  # U+001C is not White_Space
    assert normalize_text("it’s ﬁ Ｆ &amp;") == "it’s ﬁ ｆ &amp;"  # no ftfy, no unescaping
    assert normalize_text("İ") == "i\u0307"


def test_split_words() -> None:
    words = ["it", "'s", "a", "cat", "'s", "1", "2", "toys", "!!'", "s"]
    assert split_words("it's a cat's 12 toys!!'s") == words
    assert split_words("a<|endoftext|>!") == ["a", "<|", "endoftext", "|>", "!"]
    assert split_words("x\x1c y\u3000z") == ["x", "\x1c", "y", "z"]


def test_whitespace_set_is_unicode_white_space() -> None:
    # Python's isspace() is White_Space plus the four information separators U+001C..U+001F.
    expected = {chr(c) for c in range(0x3001) if chr(c).isspace()} - set("\x1c\x1d\x1e\x1f")
    assert set(rt.WHITESPACE) == expected


# -- truncation ---------------------------------------------------------------------------------


def _words_prompt(n: int) -> str:
    """n distinct one-token words ("cat", "dog", ...) cycling through a short list."""
    words = ["cat", "dog", "red", "blue", "tree", "sky", "sun", "moon"]
    return " ".join(words[i % len(words)] for i in range(n))


def test_long_prompt_truncation_matches_reference(ours: CLIPTokenizer, reference) -> None:
    prompt = "a beautiful landscape, " * 20 + "and finally the words that do not fit"
    tokens = ours.tokenize(prompt)
    assert tokens == reference_tokens(reference, prompt)
    assert len(tokens.ids) == MAX_LENGTH and tokens.ids[0] == BOS and tokens.ids[-1] == EOS
    assert tokens.truncated.endswith("and finally the words that do not fit")


def test_truncation_boundary(files: tuple[Path, Path]) -> None:
    tok = CLIPTokenizer.from_files(*files)
    exact = tok.tokenize(_words_prompt(75))
    assert exact.truncated == "" and exact.ids[-1] == EOS and EOS not in exact.ids[1:-1]
    one_over = tok.tokenize(_words_prompt(75) + " zebra")
    assert one_over.ids == exact.ids
    assert one_over.truncated == "zebra"


@pytest.mark.parametrize("alphabet", ["abcdefghijklmnopqrstuvwxyz", "a", "ab", "!?"])
def test_very_long_single_word_matches_reference(ours: CLIPTokenizer, reference, alphabet: str) -> None:
    """One 20,000-character word: all of it goes through BPE (the truncated text reports it all)
    and gives the reference's ids; runs of one letter exercise chains of equal-rank pairs."""
    word = "".join(random.Random(len(alphabet)).choices(alphabet, k=20_000))
    assert ours.prompt_ids(word) == reference(word).input_ids[1:-1]
    assert ours.tokenize(word) == reference_tokens(reference, word)


def test_truncation_inside_emoji_matches_reference(ours: CLIPTokenizer, reference) -> None:
    # Multi-token emoji: the cut can fall inside one character's bytes (decoded as U+FFFD).
    for offset in range(4):
        prompt = "x " * offset + "👩🏽‍🚀" * 40
        assert ours.tokenize(prompt) == reference_tokens(reference, prompt)


# -- property-style sweep -----------------------------------------------------------------------

_POOL = [
    *"abcxyzABCXYZ0123456789'!?.,;:-_()[]<>|/\\\"#@&*",
    # whitespace, including what Python but not the reference calls whitespace (U+001C..U+001F)
    " ", "  ", "\t", "\n", "\r\n", "\x0b", "\x1c", "\x1f", "\x85", "\xa0", "\u2003", "\u3000",
    "\u200b",
    # accents, composed and decomposed; case-mapping oddities
    "é", "e\u0301", "ü", "ñ", "Å", "A\u030a", "ß", "ẞ", "İ", "ı", "Σ", "ΟΔΟΣ", "ǅ", "ﬁ", "Ｆ",
    # numbers that are not ASCII digits
    "１", "²", "½", "Ⅻ", "٣", "३", "一",
    # other scripts
    "猫", "中文", "日本語", "ひらがな", "カタカナ", "ｶ", "Привет", "مرحبا", "ـ", "שלום", "한국어", "ไทย",
    # emoji: plain, skin tone, ZWJ sequences, variation selector, flags, a lone modifier
    "🐈", "👩🏽‍🚀", "👨‍👩‍👧", "❤️", "🏳️‍🌈", "🇫🇷", "\U0001f3fb",
    # contractions and special-token spellings
    "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "’", "don't", "we're",
    "<|startoftext|>", "<|endoftext|>", "<|ENDOFTEXT|>", "<|endoftext",
    # odd code points and common prompt words
    "\ufffd", "\x00", "\x7f", "\u00ad",
    "photo", "cat", "Portrait", " of ", "masterpiece", "1024x768",
]


def _random_prompts(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    # Mostly short strings, every tenth long enough to be truncated.
    lengths = [rng.randint(0, 150 if i % 10 == 0 else 30) for i in range(count)]
    return ["".join(rng.choices(_POOL, k=k)) for k in lengths]


def test_random_strings_match_reference(ours: CLIPTokenizer, reference) -> None:
    mismatches = [
        prompt for prompt in _random_prompts(seed=1234, count=200)
        if ours.tokenize(prompt) != reference_tokens(reference, prompt)
    ]
    assert mismatches == []


# -- runtime constraints ------------------------------------------------------------------------


def test_runtime_import_is_light() -> None:
    code = (
        "import sys, coreml_sd.runtime.tokenizer\n"
        "heavy = {'transformers', 'tokenizers', 'torch', 'ftfy', 'regex'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_word_cache_gives_same_ids(files: tuple[Path, Path]) -> None:
    tok = CLIPTokenizer.from_files(*files)
    first = tok.encode("an astronaut riding a horse, astronaut, horse")
    assert tok.encode("an astronaut riding a horse, astronaut, horse") == first
    assert tok._word_ids.cache_info().hits > 0
