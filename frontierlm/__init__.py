"""FrontierLM: raw text to an aligned chat model with one tool."""

__version__ = "0.1.0"
