"""icl-locate: find where in-context learning happens inside a decoder LLM.

The Python API (``icl_locate/api.py``; the README's "Python API") is exposed here by name and loaded on
first use (PEP 562), so that ``import icl_locate`` and the command line's parsing import no torch,
transformers or pandas::

    import icl_locate as icl

    lm = icl.load_model("tiny:llama")  # icl_locate.api is imported here
"""

import importlib

__version__ = "0.1.0"

# The names of icl_locate.api, listed here once (api.py imports this list as its own __all__). They
# are provided by __getattr__ below, which pyright cannot see, hence the file-level setting that follows.
# pyright: reportUnsupportedDunderAll=false
__all__ = [
    "load_model",
    "prompts",
    "generate",
    "sweep",
    "plan",
    "atlas",
    "run",
    "bench",
    "prune",
    "lora_sweep",
    "report",
    "open_store",
    "Item",
    "Output",
    "Study",
    "LoadedModel",
    "SweepConfig",
    "SweepResult",
    "RaySettings",
    "MaskFrom",
    "MaskBelow",
    "HeadMask",
    "AblateLayers",
    "UNCHANGED",
    "UserError",
]


def __getattr__(name: str):
    """An API name, taken from ``icl_locate.api`` when first asked for. The module is imported by name:
    an import statement here would put the package above api in the import graph, and modules below api
    read ``__version__`` from the package (a cycle for ``tests/test_architecture.py``); at run time this
    runs only after the package is initialised, so no cycle can bite."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.api"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
