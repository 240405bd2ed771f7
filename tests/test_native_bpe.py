"""Ember's native byte-level BPE (``ember._native.BpeEncoder``, used by ``ember prepare``)
gives exactly the ids of the Hugging Face ``tokenizers`` library.

The pre-tokenizer is checked on every Unicode code point (the regex engines' Unicode
tables must agree), the merges on real and generated text with tokenizers trained
here, in both the GPT-2 and the Llama 3 shape.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ember._native import SUPPORTED_PRETOKENIZER_PATTERNS, BpeEncoder
from ember.data.corpus import stdlib_texts
from ember.data.encoders import HFEncoder

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

PATTERNS = dict(SUPPORTED_PRETOKENIZER_PATTERNS)
BYTES_ONLY = [(bytes([b]), b) for b in range(256)]  # pre-tokenizing needs no real vocabulary


def library_pre_tokenizer(name: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=name == "gpt2")
    if name == "gpt2":
        return byte_level
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PATTERNS[name]), behavior="isolated"), byte_level])


def code_point_texts(context: str, chunk: int = 8192):
    """Every code point but the surrogates, each in ``context``, ``chunk`` to a text."""
    points = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    for i in range(0, len(points), chunk):
        yield "|".join(context.format(c=chr(c)) for c in points[i : i + chunk])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_pre_tokenizer_splits_like_the_library_on_every_code_point(name):
    ours = BpeEncoder(BYTES_ONLY, [], PATTERNS[name])
    theirs = library_pre_tokenizer(name)
    # The contexts exercise each branch: contractions, a leading space or symbol before
    # letters, digit runs, whitespace runs before a non-space, line breaks.
    for context in ("'{c}{c} {c}1", "\n {c}a  {c}\t"):
        for text in code_point_texts(context):
            expected = [span for _, span in theirs.pre_tokenize_str(text)]
            got = ours.pre_tokenize(text)
            if got != expected:
                k = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
                pytest.fail(f"{name}: first difference at {got[k]} vs {expected[k]}: {text[expected[k][0] - 4 : expected[k][1] + 4]!r}")


def test_the_code_point_check_can_fail():
    """The comparison above is live: two different patterns disagree on the same text."""
    text = next(code_point_texts("'{c}{c} {c}1", chunk=512))
    gpt2 = BpeEncoder(BYTES_ONLY, [], PATTERNS["gpt2"]).pre_tokenize(text)
    assert gpt2 != [span for _, span in library_pre_tokenizer("llama3").pre_tokenize_str(text)]
    assert gpt2 == [span for _, span in library_pre_tokenizer("gpt2").pre_tokenize_str(text)]


# -- tokenizers -----------------------------------------------------------------------


def corpus() -> list[str]:
    return [t[:6000] for t in stdlib_texts(max_bytes=1_500_000) if t.strip()]


def train(shape: str, vocab_size: int = 3000, ignore_merges: bool = False) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = library_pre_tokenizer(shape)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    texts = corpus()
    tok.train_from_iterator(texts[: len(texts) // 2] + ["naïve café — ünïcödé ✓ 日本語 ½ ² ⅷ 😀"] * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 1)])
    if ignore_merges:
        spec = json.loads(tok.to_str())
        spec["model"]["ignore_merges"] = True
        tok = Tokenizer.from_str(json.dumps(spec))
    return tok


SHAPES = {
    "gpt2": ("gpt2", False),
    "gpt2-whole": ("gpt2", True),
    "llama3": ("llama3", True),
    "llama3-merges": ("llama3", False),
    "digits": ("cl100k_single_digits", True),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def tokenizer_dir(request, tmp_path_factory) -> Path:
    shape, ignore = SHAPES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    train(shape, ignore_merges=ignore).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return d


def library_ids(tok_dir: Path, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    ids = [e.ids for e in tok.encode_batch(texts)]  # its post-processor adds <s> ... </s>
    return np.concatenate([np.asarray(i, np.int64) for i in ids]), np.array([len(i) for i in ids], np.int64)


def assert_same_ids(encoder: HFEncoder, tok_dir: Path, texts: list[str]) -> None:
    tokens, lengths = encoder.encode_batch(texts)
    want_tokens, want_lengths = library_ids(tok_dir, texts)
    assert np.array_equal(lengths, want_lengths)
    if not np.array_equal(tokens, want_tokens):
        k = int(np.argmax(tokens[: len(want_tokens)] != want_tokens[: len(tokens)]))
        pytest.fail(f"first different id at {k}: {tokens[k - 3 : k + 3]} vs {want_tokens[k - 3 : k + 3]}")


def test_native_encoder_gives_the_library_ids_on_held_out_source(tokenizer_dir):
    encoder = HFEncoder(str(tokenizer_dir))
    assert encoder.engine == "native", encoder.engine_note
    texts = corpus()
    assert_same_ids(encoder, tokenizer_dir, texts[len(texts) // 2 :])


ALPHABET = st.sampled_from(list("ab e1234567890 \t\n\r'sStTdlLmvVrR_=-(){}<>./\\\"") + ["  ", "\n\n", "é", "日本", "😀", "\u3000", "\u00a0", "ſ", "K", "½", "٣"])
TEXT = st.lists(ALPHABET | st.text(max_size=4) | st.integers(0, 400).map(lambda n: "=" * n), max_size=60).map("".join)


@given(texts=st.lists(TEXT, min_size=1, max_size=6))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_native_encoder_gives_the_library_ids_on_generated_text(tokenizer_dir, texts):
    assert_same_ids(HFEncoder(str(tokenizer_dir)), tokenizer_dir, texts)


def test_documents_with_added_token_text_take_the_library_path(tokenizer_dir):
    encoder = HFEncoder(str(tokenizer_dir))
    texts = ["plain text", "a <s> inside", "x</s>y and more", "", "tail <s>"]
    assert_same_ids(encoder, tokenizer_dir, texts)
    # The library matches "<s>" as the special token; as plain bytes it would be several ids.
    before = encoder.library_documents
    tokens, lengths = encoder.encode_batch(["a <s> inside"])
    assert list(tokens).count(0) == 2 and lengths[0] == len(tokens)
    assert encoder.library_documents == before + 1


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda t: setattr(t, "normalizer", normalizers.NFC()), "normalizer"),
        (lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=True)), "prefix space"),
        (lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\w+|\W"), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])), "regex"),  # noqa: E501
        (lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Metaspace()), "pre-tokenizer"),
        (lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)), "without a regex"),
    ],
)
def test_other_tokenizers_use_the_library(tmp_path, change, reason):
    tok = train("gpt2", vocab_size=400)
    change(tok)
    tok.save(str(tmp_path / "tokenizer.json"))
    encoder = HFEncoder(str(tmp_path))
    assert encoder.engine == "tokenizers" and reason in encoder.engine_note
    texts = ["some text, naïve", "x = 1\n"]
    assert_same_ids(encoder, tmp_path, texts)


def test_a_vocabulary_without_every_byte_uses_the_library(tmp_path):
    """Trained without the byte alphabet, a BPE lacks the bytes its corpus never had;
    the library drops such characters, the native encoder declines."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = library_pre_tokenizer("gpt2")
    tok.train_from_iterator(["plain ascii text only"] * 20, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    encoder = HFEncoder(str(tmp_path))
    assert encoder.engine == "tokenizers" and "no token for byte" in encoder.engine_note
    assert_same_ids(encoder, tmp_path, ["plain text, naïve", "ascii"])


def test_a_repeated_merge_gives_the_library_ids(tmp_path):
    spec = json.loads(train("gpt2", vocab_size=400).to_str())
    spec["model"]["merges"].insert(5, spec["model"]["merges"][40])  # the library loads it
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    encoder = HFEncoder(str(tmp_path))
    assert_same_ids(encoder, tmp_path, corpus()[:20])


def test_native_can_be_turned_off(tokenizer_dir):
    encoder = HFEncoder(str(tokenizer_dir), native=False)
    assert encoder.engine == "tokenizers"
    assert_same_ids(encoder, tokenizer_dir, ["def f(x):\n    return x  # done\n"])


def test_merges_as_strings_or_pairs_build_the_same_encoder():
    """tokenizer.json has held merges as "a b" strings (older files) and as [a, b] pairs."""
    spec = json.loads(train("gpt2", vocab_size=400).to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in merges]
    as_pairs = BpeEncoder.from_byte_level(vocab, pairs, PATTERNS["gpt2"])
    as_strings = BpeEncoder.from_byte_level(vocab, [" ".join(p) for p in pairs], PATTERNS["gpt2"])
    text = "".join(corpus()[:5])
    assert as_pairs.encode(text) == as_strings.encode(text) and len(as_pairs.encode(text)) < 0.8 * len(text.encode())
    with pytest.raises(ValueError, match="merge 0"):
        BpeEncoder.from_byte_level(vocab, [["a b", "c"], *pairs], PATTERNS["gpt2"])
