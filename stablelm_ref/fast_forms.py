"""The fast forms of a model, one per device: what `model.fast()` returns.

The reference model (model.py, heads.py) is the specification and imports none of its fast forms.
Each fast form registers a factory here when its module is imported (stablelm_ref/__init__.py
imports them), and `StableLmForCausalLM.fast()` asks for the one of the model's device:

    register("cpu", FastCpuModel)        # fast_cpu.py: fused NumPy + BLAS, the same function
    fast_form(model)                     # -> the registered factory(model), or a clear error

This module imports nothing from the package, so any module may import it without a cycle.
"""

from __future__ import annotations

import threading

from .errors import StableLmError

_FACTORIES: dict = {}
MAKING = threading.RLock()    # held while a form is made (model.fast(), fast_cpu.FastCpuModel(model)): one at a time,
                              # as a build rewrites model.params (two at once on one model failed, see fast_form)


def register(device: str, factory) -> None:
    """Make `factory(model)` the fast form of models on `device` ("cpu" or "gpu")."""
    _FACTORIES[device] = factory


def fast_form(model):
    """The fast form registered for model.device, built from the model. The caller holds MAKING, so that threads
    asking one model for its form at once get one form: the CPU form's build replaces model.params' tensors and
    transposes lm_head in place (popped from params meanwhile), and a second build beside it failed with a
    KeyError from inside, or could have transposed the same memory twice."""
    factory = _FACTORIES.get(model.device)
    if factory is None:
        known = ", ".join(sorted(_FACTORIES)) or "none"
        raise StableLmError(f"no fast form is registered for device {model.device!r} (registered: {known}); "
                            "use the model itself")
    return factory(model)
