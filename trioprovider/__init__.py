"""trioprovider: a local OpenAI- and Ollama-compatible model provider whose models are agents.

A client's request is authenticated, limited and tracked here, then carried over a WebSocket bridge
to an agent (the Cursor agent, an upstream server, or the echo reference agent) that streams the
answer back. See ``docs/`` and the README.
"""

__version__ = "0.1.0"
