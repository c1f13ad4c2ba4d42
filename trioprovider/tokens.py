"""Token estimates, for rate limits and usage when an agent reports none.

Agents are not tokenizers; ~4 characters per token is the usual rule of thumb for English and
code, and errs on the side of counting more for short inputs.
"""

from __future__ import annotations

from typing import Any


def tokens_for_chars(length: int) -> int:
    return (length + 3) // 4


def estimate_tokens(text: str) -> int:
    return tokens_for_chars(len(text))


def message_text(message: dict[str, Any]) -> str:
    """The text of an OpenAI chat message: string content, or its text parts joined."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def estimate_prompt_tokens(messages: list[dict[str, Any]] | None, prompt: str | None = None) -> int:
    """Prompt tokens of a chat (content plus a few per message for roles) or a completion."""
    if messages is None:
        return estimate_tokens(prompt or "")
    return sum(estimate_tokens(message_text(m)) + 4 for m in messages)
