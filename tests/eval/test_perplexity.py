import math

import pytest
import torch

from helpers import tiny_model, tiny_tokenizer
from qdoctor.calib.text import wikitext_text
from qdoctor.errors import QDoctorError
from qdoctor.eval.perplexity import perplexity, token_windows


def test_ppl_equals_token_by_token_loop():
    """Second derivation: sum log-softmax of each next token, one position at a time."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    text = wikitext_text("test")[:20_000]
    res = perplexity(model, tok, text=text, seqlen=64, limit=3, progress=False)
    wins = token_windows(tok, text, 64)[:3]
    total, n = 0.0, 0
    with torch.no_grad():
        for w in wins:
            logp = torch.log_softmax(model(w[None]).logits[0].double(), -1)
            for t in range(1, 64):
                total -= float(logp[t - 1, w[t]])
                n += 1
    assert res.n_tokens == n == 3 * 63
    assert res.ppl == pytest.approx(math.exp(total / n), rel=1e-5)


def test_windows_recipe_and_bos():
    tok = tiny_tokenizer()
    text = wikitext_text("test")[:5000]
    ids = tok(text, add_special_tokens=False).input_ids
    w = token_windows(tok, text, 50)
    assert w.shape[0] == len(ids) // 50 and w[1].tolist() == ids[50:100]
    wb = token_windows(tok, text, 50, bos_id=0)
    assert wb[:, 0].eq(0).all() and wb[0, 1:].tolist() == ids[:49]


def test_shipped_test_split_rows():
    text = wikitext_text("test")
    assert text.startswith("\n\n = Robert Boulter = \n")
    assert len(text) > 1_200_000


def test_too_short_and_empty_text():
    tok = tiny_tokenizer()
    with pytest.raises(QDoctorError, match="fewer than one window"):
        token_windows(tok, "a few words", 2048)
    with pytest.raises(QDoctorError, match="empty"):
        token_windows(tok, "   ", 16)
