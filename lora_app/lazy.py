"""Package namespaces that import a submodule when one of its names is first used.

``lora_app.lora`` and ``lora_app.data`` export names from submodules that need torch. The run
settings (``training/config.py``) use only their torch-free parts (the choices and checks), and stay
importable without torch, so a package's ``__init__`` resolves each exported name on first access.
"""

from __future__ import annotations

import importlib


def exports(package: str, modules: dict[str, tuple[str, ...]]):
    """``(__getattr__, __all__)`` for ``package``, whose names live in ``modules`` (submodule -> names)."""
    home = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str):
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{home[name]}"), name)

    return __getattr__, sorted(home)
