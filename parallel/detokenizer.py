"""Incremental detokenization and stop strings for one request.

Decoding token by token is wrong for byte-level BPE (a character may span tokens) and for SentencePiece
(leading spaces depend on context). As in vLLM and TGI we decode a window twice — up to the last emitted
token and up to the newest — and emit the difference only when it does not end in U+FFFD, i.e. never half a
multi-byte character — not even at the end, like vLLM: bytes that never complete a character are dropped.
While a stop string could still be forming, its possible prefix is held back.
"""

from __future__ import annotations

from parallel.sampling_params import SamplingParams
from parallel.tokenizer import Tokenizer

_CONTEXT = 5  # prompt tokens decoded ahead of the output, so the first token's leading space comes out right


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas; finds stop strings.

    Example:
        >>> d = IncrementalDetokenizer(tok, prompt_ids=[1, 40], params=SamplingParams(stop=["\\n\\n"]))
        >>> d.push([105, 7]); d.stop_reason is None
        True
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self._ids = list(prompt_ids[-_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""
        self._emitted = 0
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        self.stop_reason: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.params.skip_special_tokens)

    def push(self, new_ids: list[int]) -> None:
        """Append tokens; updates ``text``; sets ``stop_reason`` (and truncates) when a stop string appears."""
        for token_id in new_ids:
            self._ids.append(token_id)
            prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
            full = self._decode(self._ids[self._prefix_offset:])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                before = len(self.text)
                self.text += full[len(prefix):]
                self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
                if self.params.stop and self._find_stop(before):
                    return

    def _find_stop(self, before: int) -> bool:
        start = max(0, before - self._hold)
        for stop in self.params.stop:
            idx = self.text.find(stop, start)
            if idx != -1:
                self.text = self.text[:idx + len(stop) if self.params.include_stop_str_in_output else idx]
                self.stop_reason = stop
                return True
        return False

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out; while running, the tail that could begin a stop string is held back."""
        end = len(self.text) if finished or self.stop_reason else max(self._emitted, len(self.text) - self._hold)
        delta = self.text[self._emitted:end]
        self._emitted = end
        return delta
