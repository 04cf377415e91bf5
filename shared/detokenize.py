"""Token ids to streamed text, one token at a time, without broken characters or lost spaces.

Decoding a token alone is wrong twice over: byte-level BPE may split one UTF-8 character across tokens (a lone piece
decodes to U+FFFD), and SentencePiece-style decoders drop or add a leading space depending on what comes before. So
each step decodes a short window of recent tokens twice, with and without the new ones, and emits the difference
(vLLM's prefix/read offsets): ``prefix_offset`` starts the context window, ``read_offset`` is where emitted text ends.
"""

from __future__ import annotations

import tokenizers

# Tokens of prompt kept as context before the first generated token, enough for every decoder's spacing rules.
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """One sequence's text stream: ``push`` each generated token, ``flush`` when the sequence ends."""

    def __init__(
        self, tokenizer: tokenizers.Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids = list(
            prompt_ids[max(0, len(prompt_ids) - _CONTEXT_TOKENS) :]
        )  # only the window is ever decoded again
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        """The text this token completes; empty while it ends inside a multi-byte character."""
        self._ids.append(token_id)
        prefix_text, full_text = self._decode_window()
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT):
            self._advance()
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character decodes as U+FFFD, as a full decode would)."""
        prefix_text, full_text = self._decode_window()
        self._advance()
        return full_text[len(prefix_text) :]

    def _decode_window(self) -> tuple[str, str]:
        window = self._ids[self._prefix_offset :]
        prefix = self._tokenizer.decode(window[: self._read_offset - self._prefix_offset], self._skip_special)
        return prefix, self._tokenizer.decode(window, self._skip_special)

    def _advance(self) -> None:
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        # drop what no later window will read, so memory stays constant however long the sequence runs
        del self._ids[: self._prefix_offset]
        self._read_offset -= self._prefix_offset
        self._prefix_offset = 0
