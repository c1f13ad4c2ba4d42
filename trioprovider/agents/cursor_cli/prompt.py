"""What the Cursor CLI is told: one prompt per run, and which chat it continues. Pure.

The CLI has no system-prompt flag and takes one prompt per run, so a conversation is rendered
into one text (instructions first, then the turns). A provider session maps to Cursor chats:
when a client sends the conversation it had before plus the answer it got and new user turns,
only those turns are sent, with ``--resume``; anything else starts a new chat.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from trioprovider.tokens import message_text

_INSTRUCTION_ROLES = ("system", "developer")
_ROLE_HEADINGS = {"user": "User", "assistant": "Assistant", "tool": "Tool result"}


def render_conversation(messages: list[dict[str, Any]]) -> str:
    """One prompt for a whole conversation: system/developer text first, then the turns.

    A lone user message is sent as it is; anything longer is laid out with a heading per turn,
    ending with the request to answer the last one.
    """
    instructions = [message_text(m) for m in messages if m.get("role") in _INSTRUCTION_ROLES]
    turns = [m for m in messages if m.get("role") not in _INSTRUCTION_ROLES]
    if not instructions and len(turns) == 1 and turns[0].get("role") == "user":
        return message_text(turns[0])
    parts: list[str] = []
    if instructions:
        parts.append("# Instructions\n\n" + "\n\n".join(text for text in instructions if text))
    if turns:
        rendered = "\n\n".join(_render_turn(m) for m in turns)
        parts.append("# Conversation\n\n" + rendered)
        parts.append(_closing(turns[-1]))
    return "\n\n".join(parts)


def render_new_turns(messages: list[dict[str, Any]]) -> str:
    """The prompt for turns added to a chat Cursor already holds: the users' words, as they are."""
    return "\n\n".join(message_text(m) for m in messages)


def render_completion(prompt: str, suffix: str | None) -> str:
    """A completion (or fill-in-the-middle) request as an instruction to the agent."""
    if suffix:
        return (
            "Fill in the text that belongs at <|fill-here|> in the document below. Reply with only "
            "that text: no explanation, no code fences, nothing repeated from around it.\n\n"
            f"{prompt}<|fill-here|>{suffix}"
        )
    return (
        "Continue the document below from exactly where it stops. Reply with only the "
        "continuation: no explanation, no code fences, nothing repeated from it.\n\n"
        f"{prompt}"
    )


def _render_turn(message: dict[str, Any]) -> str:
    role = str(message.get("role", "user"))
    heading = _ROLE_HEADINGS.get(role, role.capitalize())
    if role == "tool" and message.get("tool_call_id"):
        heading += f" ({message['tool_call_id']})"
    text = message_text(message)
    for call in message.get("tool_calls") or ():
        function = (call.get("function") or {}) if isinstance(call, dict) else {}
        text += f"\n(called {function.get('name', 'a tool')} with {function.get('arguments', '{}')})"
    return f"## {heading}\n\n{text.strip()}"


def _closing(last: dict[str, Any]) -> str:
    if last.get("role") == "assistant":
        return "# Your turn\n\nContinue the assistant's last message."
    return "# Your turn\n\nAnswer the last message above, as the assistant."


def fingerprint(message: dict[str, Any]) -> str:
    """What identifies a message when comparing histories: role, text (ends trimmed: clients
    tidy whitespace) and any tool-call fields."""
    data = [
        message.get("role"),
        message_text(message).strip(),
        message.get("tool_calls"),
        message.get("tool_call_id"),
    ]
    encoded = json.dumps(data, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(encoded.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class ChatPlan:
    """How to send one conversation: continue ``chat_id`` with ``prompt``, or (``chat_id`` None)
    start a new chat with the whole conversation."""

    chat_id: str | None
    prompt: str
    #: Fingerprints of the whole conversation as sent (recorded with the answer afterwards).
    conversation: tuple[str, ...]


@dataclass
class _Chat:
    chat_id: str
    #: Fingerprints of everything the chat holds: what was sent, then the answer.
    history: tuple[str, ...]


@dataclass
class ChatBook:
    """Which Cursor chats each provider session has, and what each one holds.

    A chat being answered is out of the book (:meth:`plan` takes it), so two requests never
    continue one chat at once, and a run that fails or is cancelled, leaving the chat in an
    unknown state, is simply never put back. Bounded: the least recently used chats go first.
    """

    max_sessions: int = 256
    chats_per_session: int = 4
    _sessions: OrderedDict[str, list[_Chat]] = field(default_factory=OrderedDict)

    def plan(self, session_id: str, messages: list[dict[str, Any]]) -> ChatPlan:
        conversation = tuple(fingerprint(m) for m in messages)
        chats = self._sessions.get(session_id, [])
        for chat in chats:
            if _continues(chat.history, messages, conversation):
                chats.remove(chat)
                return ChatPlan(chat.chat_id, render_new_turns(messages[len(chat.history) :]), conversation)
        return ChatPlan(None, render_conversation(messages), conversation)

    def record(self, session_id: str, chat_id: str, conversation: tuple[str, ...], answer: str) -> None:
        """``chat_id`` now holds ``conversation`` followed by the assistant's ``answer``."""
        history = (*conversation, fingerprint({"role": "assistant", "content": answer}))
        chats = self._sessions.pop(session_id, [])
        chats = [chat for chat in chats if chat.chat_id != chat_id]
        chats.insert(0, _Chat(chat_id, history))
        del chats[self.chats_per_session :]
        self._sessions[session_id] = chats
        while len(self._sessions) > self.max_sessions:
            self._sessions.popitem(last=False)

    def chats(self, session_id: str) -> list[str]:
        """The ids of the chats a session can continue, most recent first."""
        return [chat.chat_id for chat in self._sessions.get(session_id, [])]


def _continues(history: tuple[str, ...], messages: list[dict[str, Any]], conversation: tuple[str, ...]) -> bool:
    """The conversation is ``history`` (ending with the answer) plus one or more new user turns."""
    new = messages[len(history) :]
    return (
        len(conversation) > len(history)
        and conversation[: len(history)] == history
        and all(m.get("role") == "user" for m in new)
    )
