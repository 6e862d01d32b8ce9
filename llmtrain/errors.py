"""The two kinds of failure a user can meet, and the exit code each one maps to.

Everything the CLI reports without a traceback is one of these: code that detects bad input
raises them with a complete one-line message; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LLMTrainError(Exception):
    """A runtime failure with a message meant for the user (exit code 1)."""

    exit_code = 1


class ConfigError(LLMTrainError):
    """A bad config, override or usage (exit code 2); holds every problem found, not just one."""

    exit_code = 2

    def __init__(self, messages: list[str] | str):
        self.messages = [messages] if isinstance(messages, str) else list(messages)
        super().__init__("\n".join(self.messages))
