"""The Cursor CLI agent (``python -m trioprovider agent cursor-cli``).

- :mod:`.events`: the CLI's ``stream-json`` lines → text, reasoning, tool notes, result (pure);
- :mod:`.prompt`: conversations → one prompt, and which Cursor chat continues which (pure);
- :mod:`.process`: process groups and ending them;
- :mod:`.agent`: :class:`CursorCliAgent`, one CLI run per request.
"""

from trioprovider.agents.cursor_cli.agent import CursorCliAgent, make_cursor_cli_agent

__all__ = ["CursorCliAgent", "make_cursor_cli_agent"]
