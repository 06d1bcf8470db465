"""The tokenizer of a Hugging Face folder, read with `tokenizers` (fast, no transformers import needed)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from parallel.models.loader import read_json


def _token_str(value: object) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encode/decode plus what a server needs: special ids, the chat template.

    Example:
        >>> tok = Tokenizer.from_folder("models/tiny-code-llama")
        >>> tok.decode(tok.encode("def f():"), skip_special_tokens=True)
        'def f():'
    """

    def __init__(self, tokenizer: _HFTokenizer, config: dict, eos_token_ids: tuple[int, ...]) -> None:
        self._tok = tokenizer
        self.chat_template: str | None = config.get("chat_template")
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self.bos_token_id = tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        eos = tokenizer.token_to_id(self.eos_token) if self.eos_token else None
        self.eos_token_ids = tuple(dict.fromkeys([*eos_token_ids, *([eos] if eos is not None else [])]))
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def from_folder(cls, folder: str | Path, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer.json not found in {str(folder)!r}; pass token-id prompts with skip_tokenizer_init=True")
        config = read_json(folder, "tokenizer_config.json", required=False)
        if not config.get("chat_template") and (Path(folder) / "chat_template.jinja").is_file():
            config["chat_template"] = (Path(folder) / "chat_template.jinja").read_text()
        return cls(_HFTokenizer.from_file(str(path)), config, eos_token_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
