"""Chat prompts from a tokenizer's Jinja chat template (the Hugging Face convention), with a plain fallback."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def render_chat(messages: list[dict[str, Any]], template: str | None, bos_token: str | None = None,
                eos_token: str | None = None, add_generation_prompt: bool = True,
                tools: list[dict[str, Any]] | None = None) -> str:
    """Render messages; template errors (e.g. a role the template refuses) become ValueError. ``tools``: the
    request's tool definitions, which templates that know tools render (``tools=``, as transformers and vLLM
    pass them); assistant messages may carry ``tool_calls`` and tool messages ``tool_call_id``.

    Example:
        >>> render_chat([{"role": "user", "content": "hi"}], None)
        'user: hi\\nassistant:'
    """
    try:
        return _compile(template or FALLBACK_TEMPLATE).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "", eos_token=eos_token or "", tools=tools)
    except jinja2.exceptions.TemplateError as err:
        raise ValueError(f"chat template failed: {err}") from err
