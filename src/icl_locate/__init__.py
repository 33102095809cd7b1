"""icl-locate: find where in-context learning happens inside a decoder LLM."""

__version__ = "0.1.0"
