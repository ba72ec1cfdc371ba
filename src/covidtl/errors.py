"""Errors a user can cause and fix: shown as one line, never as a traceback."""


class UserError(Exception):
    """A problem with input, data or settings that the message tells how to fix."""
