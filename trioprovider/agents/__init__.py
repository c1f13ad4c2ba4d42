"""Agents: the bridge peers that write the answers (echo, Cursor CLI, Cursor IDE via MCP, upstream)."""
