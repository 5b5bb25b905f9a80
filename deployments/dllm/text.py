"""The text of one response while its unmasked prefix grows: what may be sent, where a stop string ends it.

A diffusion LM fixes response tokens in any order; only the prefix before the first
mask is final, so a stream sends text as that prefix grows. Decoding a token prefix can
end inside a UTF-8 character (byte-level BPE) or inside a stop string that the next
tokens complete, so the tail that could still change is held back until it cannot.
The unstreamed answer is built from the same deltas, so streamed == unstreamed.
"""

from __future__ import annotations

from typing import Literal


class ResponseText:
    def __init__(self, tokenizer, stops: tuple[str, ...], max_tokens: int) -> None:
        self.tokenizer, self.stops, self.max_tokens = tokenizer, stops, max_tokens
        self._hold = max((len(s) for s in stops), default=1) - 1  # a stop string may start in the last chars
        self.text = ""  # sent so far
        self.completion_tokens = 0
        self.stopped = False  # a stop string ended the text

    def update(self, token_ids: tuple[int, ...], final: bool) -> str:
        """The new text after the response prefix became `token_ids` (`final`: the whole response)."""
        if self.stopped:
            return ""
        self.completion_tokens = len(token_ids)
        text = self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            text, final, self.stopped = text[:min(cuts)], True, True
        if not final:
            text = text.rstrip("\ufffd")  # an incomplete UTF-8 character: its next bytes are still masked
            text = text[:max(len(self.text), len(text) - self._hold)]
        if not text.startswith(self.text):  # a longer prefix decoded differently: keep what was sent consistent
            return ""
        delta, self.text = text[len(self.text):], text
        return delta

    def finish_reason(self) -> Literal["stop", "length"]:
        """'stop' for a stop string or an EOS before `max_tokens` (the response ids end before it), else 'length'."""
        return "stop" if self.stopped or self.completion_tokens < self.max_tokens else "length"
