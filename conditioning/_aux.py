"""Import one controlnet-aux detector without importing all of them.

controlnet-aux's package ``__init__`` imports every detector eagerly (about 8 s, with timm,
segment-anything and an optional mediapipe), so one broken optional piece breaks them all.
Here the package is registered as a bare namespace and only the submodule asked for is
imported. The first access to a name the bare package lacks (``from controlnet_aux import
X`` elsewhere in the process) runs the real ``__init__`` then, so other code still sees the
ordinary package.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

from slider_cn.errors import ConfigError

_PACKAGE = "controlnet_aux"


def _install_lazy_package() -> None:
    if _PACKAGE in sys.modules:
        return
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        raise ConfigError("controlnet-aux is not installed: pip install 'controlnet-aux>=0.0.9'")
    package = types.ModuleType(_PACKAGE)
    package.__spec__ = spec
    package.__file__ = spec.origin
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = _PACKAGE
    state = {"initialised": False}

    def __getattr__(name: str) -> Any:  # noqa: N807 - module-level __getattr__ (PEP 562)
        if name.startswith("__") or state["initialised"]:
            raise AttributeError(f"module '{_PACKAGE}' has no attribute '{name}'")
        state["initialised"] = True
        spec.loader.exec_module(package)  # the real __init__, into this module
        try:
            return package.__dict__[name]
        except KeyError:
            raise AttributeError(f"module '{_PACKAGE}' has no attribute '{name}'") from None

    package.__getattr__ = __getattr__
    sys.modules[_PACKAGE] = package


def aux_class(detector: str, module: str, class_name: str, requires: tuple[str, ...] = ()) -> type:
    """controlnet_aux.<module>.<class_name>, or a ConfigError naming what is missing."""
    for requirement in requires:
        if importlib.util.find_spec(requirement) is None:
            raise ConfigError(
                f"detector '{detector}' needs the optional package '{requirement}', which is "
                f"not installed: pip install {requirement}"
            )
    _install_lazy_package()
    try:
        mod = importlib.import_module(f"{_PACKAGE}.{module}")
    except ImportError as exc:
        raise ConfigError(
            f"detector '{detector}' could not be imported from controlnet-aux "
            f"({_PACKAGE}.{module}): {exc}; the other detectors are unaffected"
        ) from exc
    return getattr(mod, class_name)
