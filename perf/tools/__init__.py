"""Load tools: command builders and output parsers (pure, tested without running them)."""


class ToolOutputError(ValueError):
    """A tool's output could not be read (it failed, or printed something unexpected)."""
