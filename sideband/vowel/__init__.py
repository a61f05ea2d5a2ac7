"""Trusted-server sessions on a self-hosted vowel engine: mint a scoped token, connect, drive the
conversation from code with the app's tools (the same call runtime as a phone call)."""

from sideband.vowel.session import EngineError, EngineSession, Reply

__all__ = ["EngineError", "EngineSession", "Reply"]
