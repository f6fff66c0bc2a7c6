"""families/diffusers_unet.py: the pixel-space families import diffusers' UNet without the rest of diffusers (job
start-up), and the classes, models and training are the same as through the plain `from diffusers import ...`.

Every check runs in a fresh interpreter: what a module import loads is only visible in a process that has not
imported it yet."""

from __future__ import annotations

import json
import subprocess
import sys

# UNet2DModel's blocks need these two modules of diffusers.models.transformers, nothing else of that package.
NEEDED_TRANSFORMER_MODULES = {
    "diffusers.models.transformers.dual_transformer_2d",
    "diffusers.models.transformers.transformer_2d",
}


def run_python(repo, code: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_ddpm_training_stage_imports_neither_dynamo_nor_diffusers_models(repo):
    """A training job's import: no torch._dynamo, no peft, and of diffusers' transformer and UNet packages only the
    modules UNet2DModel is made of (their __init__, which imports every model diffusers has, does not run)."""
    loaded = run_python(
        repo,
        "import json, sys; import workflow_scripts.stages.train; "
        "transformers = sys.modules.get('diffusers.models.transformers'); "
        "print(json.dumps({'modules': sorted(sys.modules), "
        "'transformers_init_ran': transformers is not None and 'FluxTransformer2DModel' in vars(transformers)}))",
    )
    modules = set(loaded["modules"])
    assert "torch" in modules and "diffusers.models.unets.unet_2d" in modules  # the import did import the UNet
    assert "torch._dynamo" not in modules
    assert "peft" not in modules
    assert not loaded["transformers_init_ran"]
    transformer_modules = {m for m in modules if m.startswith("diffusers.models.transformers.")}
    assert transformer_modules == NEEDED_TRANSFORMER_MODULES
    assert "diffusers.models.unets.unet_2d_condition" not in modules


def test_the_plain_diffusers_import_gives_the_same_classes_afterwards(repo):
    """Other code of the same process (the latent family) still imports anything of diffusers, package-level names
    included, and gets the very classes the lean import gave."""
    same = run_python(
        repo,
        "import json, sys\n"
        "from workflow_scripts.families import ddpm, diffusers_unet\n"
        "import diffusers\n"
        "from diffusers import UNet2DConditionModel, AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DModel\n"
        "from diffusers.hooks import apply_group_offloading\n"
        "from diffusers.models.transformers import Transformer2DModel\n"
        "from diffusers.models.transformers.transformer_2d import Transformer2DModel as T\n"
        "from diffusers.optimization import get_cosine_schedule_with_warmup\n"
        "print(json.dumps({\n"
        " 'unet': UNet2DModel is ddpm.UNet2DModel is diffusers_unet.UNet2DModel,\n"
        " 'unets_package': diffusers.models.unets.UNet2DModel is UNet2DModel\n"
        "     and diffusers.models.unets.UNet2DConditionModel is UNet2DConditionModel,\n"
        " 'schedulers': DDPMScheduler is ddpm.DDPMScheduler and DDIMScheduler is ddpm.DDIMScheduler,\n"
        " 'lr': get_cosine_schedule_with_warmup is ddpm.get_cosine_schedule_with_warmup,\n"
        " 'transformer': Transformer2DModel is T,\n"
        " 'hooks': diffusers.hooks.apply_group_offloading is apply_group_offloading,\n"
        "}))",
    )
    assert same == dict.fromkeys(same, True) and len(same) == 6, same


# A forward pass and three AdamW steps of the default UNet from the training's initialisation (seed 0): the hash of
# the loss values and of every parameter afterwards.
TRAIN_STEPS = r"""
import hashlib, json, sys, torch, yaml
{prelude}
from workflow_scripts.families import ddpm
torch.set_num_threads(1)
config = yaml.safe_load(open("params.yaml"))
model = ddpm.initial_model(config, (1, 8, 8), 0).to("cpu")
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
g = torch.Generator().manual_seed(1)
x0 = torch.randn(8, 1, 8, 8, generator=g)
a_bar = ddpm.alphas_cumprod(config["diffusion"])
digest = hashlib.sha256()
for step in range(3):
    t = torch.randint(0, len(a_bar), (8,), generator=g)
    eps = torch.randn(8, 1, 8, 8, generator=g)
    loss = ddpm.simple_loss(model, x0, t, eps, a_bar).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    digest.update(loss.detach().numpy().tobytes())
for value in model.state_dict().values():
    digest.update(value.numpy().tobytes())
unets = sys.modules["diffusers.models.unets"]
print(json.dumps({{"hash": digest.hexdigest(), "unets_init_ran": "UNet2DConditionModel" in vars(unets)}}))
"""


def test_the_model_and_its_training_are_bit_identical_to_the_plain_import(repo):
    lean = run_python(repo, TRAIN_STEPS.format(prelude=""))
    # all of diffusers (and torch._dynamo) imported first, as before: the lean path then has nothing to skip
    plain = run_python(repo, TRAIN_STEPS.format(prelude="import torch._dynamo\nfrom diffusers import UNet2DModel"))
    assert not lean["unets_init_ran"] and plain["unets_init_ran"]  # the two processes did import differently
    assert lean["hash"] == plain["hash"]


def test_a_diffusers_that_imports_differently_falls_back_to_the_plain_import_with_a_warning(repo):
    """If the lean import fails (here: a UNet module that needs torch._dynamo at import time), the module logs a
    warning naming the error and imports diffusers the plain way; the classes are still diffusers' own."""
    code = r"""
import json, logging, sys
logging.basicConfig(level=logging.WARNING)

class NeedsDynamo:  # stands for a diffusers release whose UNet blocks import torch._dynamo unguarded
    def find_spec(self, name, path=None, target=None):
        if name == "diffusers.models.unets.unet_2d_blocks" and sys.modules.get("torch._dynamo", 0) is None:
            raise ImportError("unet_2d_blocks needs torch._dynamo")
        return None

sys.meta_path.insert(0, NeedsDynamo())
from workflow_scripts.families import ddpm
import diffusers
print(json.dumps({"same": diffusers.UNet2DModel is ddpm.UNet2DModel}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"same": True}
    assert "could not be imported without its model packages" in result.stderr
    assert "unet_2d_blocks needs torch._dynamo" in result.stderr
