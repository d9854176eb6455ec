"""The legacy completions endpoint's log-probabilities format (service/app.py's `_CompletionFormat`)."""

from __future__ import annotations

from service.app import MIN_LOGPROB, _CompletionFormat
from service.sampling import TokenLogprobs


class _Pieces:
    """Token texts: ids 100-299 are bytes of split characters, which all read U+FFFD."""

    def text(self, token_id: int) -> str:
        return "\ufffd" if 100 <= token_id < 300 else f"t{token_id}"


def _top(entry: TokenLogprobs) -> dict[str, float]:
    return _CompletionFormat("m", _Pieces())._logprobs(0, [entry]).top_logprobs[0]


def test_top_logprobs_keep_the_highest_value_of_tokens_with_the_same_text():
    # the chosen token (124, -6.4) read as the top one (228, -3.5): its value overwrote the top one's
    assert _top(TokenLogprobs(124, -6.4, ((228, -3.5),))) == {"\ufffd": -3.5}
    assert _top(TokenLogprobs(124, -6.4, ((7, -1.0), (150, -2.0), (228, -3.5)))) == {"t7": -1.0, "\ufffd": -2.0}
    # otherwise every top token and the chosen one are listed, most likely first, -inf as OpenAI's -9999
    entry = TokenLogprobs(9, float("-inf"), ((7, -1.0), (150, -2.0)))
    assert list(_top(entry).items()) == [("t7", -1.0), ("\ufffd", -2.0), ("t9", MIN_LOGPROB)]
    assert _top(TokenLogprobs(7, -1.0, ((7, -1.0), (8, -2.0)))) == {"t7": -1.0, "t8": -2.0}
