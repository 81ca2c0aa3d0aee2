from __future__ import annotations

from services.runtime.detokenizer import IncrementalDetokenizer


def test_incremental_text_equals_full_decode(smollm2):
    tok = smollm2.tokenizer
    text = "Héllo, wörld! 你好 🙂 — done.\n  indented"
    ids = tok.encode(text)
    d = IncrementalDetokenizer(tok)
    pieces = [d.push([i]) for i in ids]
    assert "".join(pieces) + d.flush() == tok.decode(ids) == d.text


def test_stop_string_across_tokens_is_never_half_sent(smollm2):
    tok = smollm2.tokenizer
    ids = tok.encode("alpha beta gamma delta")
    d = IncrementalDetokenizer(tok, stop=("ta gam",))
    streamed = "".join(d.push([i]) for i in ids)
    assert d.stopped_by == "ta gam"
    assert d.text == "alpha be" and streamed == "alpha be"


def test_no_stop_flush_returns_held_back_tail(smollm2):
    tok = smollm2.tokenizer
    ids = tok.encode("one two three")
    d = IncrementalDetokenizer(tok, stop=("never appears here",))
    streamed = "".join(d.push([i]) for i in ids)
    assert streamed + d.flush() == "one two three"
