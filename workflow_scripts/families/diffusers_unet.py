"""The parts of diffusers the pixel-space families use (UNet2DModel, its schedulers, the attention processor and the
learning-rate schedule), imported without the rest of diffusers.

`from diffusers import UNet2DModel` runs the `__init__` of `diffusers.models.unets` and of
`diffusers.models.transformers`, which import every UNet and transformer model diffusers ships, and with them peft,
much of transformers and `torch._dynamo`; the model's first `.to()` then imports all of `diffusers.hooks` (peft
again). That is most of a job's start-up (benchmarks/startup.py) for a UNet that needs a few modules of those
packages. Here:
  - the three packages become lazy: their submodules import as single modules, and their `__init__` runs only
    when a name it defines is looked up (by other code of the same process, e.g. the latent family's
    `from diffusers import UNet2DConditionModel`); the real `__init__` then finds the modules imported here, so
    every class is the same object as through the plain import;
  - `torch._dynamo` is hidden while diffusers imports: `diffusers.utils.torch_utils` then takes its own fallback
    for a torch without dynamo (`maybe_allow_in_graph` = identity, a torch.compile hint; this workflow never
    compiles). torch loads dynamo later by itself where it needs it (a torch.optim optimizer's first parameter
    group, diffusers' `ModelMixin.to()`), so only the stages that neither train nor move a model are spared it.
The modules and classes are diffusers' own, so models, checkpoints and training are bit-identical
(tests/unit/families/test_diffusers_unet.py). If diffusers ever imports differently (the import fails inside these
bounds), the plain import is used, with a warning in the log: slower start-up, same behaviour.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from contextlib import contextmanager

# Packages whose __init__ imports all of diffusers' models (or all its hooks, which need torch._dynamo and peft);
# this workflow needs only single modules inside them.
LAZY_PACKAGES = ("diffusers.models.unets", "diffusers.models.transformers", "diffusers.hooks")
HIDDEN = "torch._dynamo"


def _lazy_package(name: str):
    """The package `name` with its __init__ not yet run: its submodules import as usual, and the first look-up of
    a name the package itself defines runs the real __init__ in place (so `from diffusers.hooks import X` and
    `diffusers.models.unets.UNet2DConditionModel` still work, and give the same objects)."""
    spec = importlib.util.find_spec(name)
    module = importlib.util.module_from_spec(spec)

    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        del module.__getattr__
        spec.loader.exec_module(module)
        try:
            return module.__dict__[attr]
        except KeyError:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}") from None

    module.__getattr__ = __getattr__
    return module


@contextmanager
def _dynamo_hidden():
    if HIDDEN in sys.modules:
        yield
        return
    sys.modules[HIDDEN] = None  # `import torch._dynamo` raises ImportError, which diffusers catches
    try:
        yield
    finally:
        if sys.modules.get(HIDDEN, 0) is None:
            del sys.modules[HIDDEN]


def _import_parts() -> dict:
    from diffusers.models.attention_processor import AttnProcessor
    from diffusers.models.unets.unet_2d import UNet2DModel
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

    return {
        "AttnProcessor": AttnProcessor,
        "UNet2DModel": UNet2DModel,
        "get_cosine_schedule_with_warmup": get_cosine_schedule_with_warmup,
        "DDIMScheduler": DDIMScheduler,
        "DDPMScheduler": DDPMScheduler,
    }


try:
    with _dynamo_hidden():
        import diffusers.models  # noqa: F401  (a lazy module: cheap)

        for _name in LAZY_PACKAGES:
            if _name not in sys.modules:
                sys.modules[_name] = _lazy_package(_name)
                # bound on its parent, as the import system does when it imports a package
                _parent, _, _child = _name.rpartition(".")
                setattr(sys.modules[_parent], _child, sys.modules[_name])
        _parts = _import_parts()
except (ImportError, RuntimeError) as exc:  # diffusers' lazy modules re-raise as RuntimeError
    logging.getLogger(__name__).warning(
        "diffusers could not be imported without its model packages (%s); importing all of it", exc
    )
    _parts = _import_parts()

AttnProcessor = _parts["AttnProcessor"]
UNet2DModel = _parts["UNet2DModel"]
get_cosine_schedule_with_warmup = _parts["get_cosine_schedule_with_warmup"]
DDIMScheduler = _parts["DDIMScheduler"]
DDPMScheduler = _parts["DDPMScheduler"]

__all__ = ["AttnProcessor", "DDIMScheduler", "DDPMScheduler", "UNet2DModel", "get_cosine_schedule_with_warmup"]
