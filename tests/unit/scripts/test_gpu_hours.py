"""benchmarks/gpu_hours.py: the latent family's network as the script builds it, on the meta device (no weights).

The LoRA parameter count of Stable Diffusion v1's UNet is checked against the analytic count, sum over the targeted
Linear layers of rank x (in + out), and the published figure (~25.5M at rank 128 on every attention projection).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from workflow_scripts.dag.config import load_config

REPO = next(p for p in Path(__file__).resolve().parents if (p / "Snakefile").is_file())


@pytest.fixture(scope="module")
def gpu_hours():
    spec = importlib.util.spec_from_file_location("gpu_hours", REPO / "benchmarks" / "gpu_hours.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def overlay(name: str) -> dict:
    return load_config(REPO / "params.yaml", REPO / "configs" / f"{name}.yaml")


def test_lora_count_of_the_sd_unet(gpu_hours):
    from diffusers import UNet2DConditionModel

    config = overlay("artbench2")
    lora = config["model"]["lora"]
    with torch.device("meta"):
        base = UNet2DConditionModel.from_config(gpu_hours.MINISD["unet"])
    targeted = [
        m
        for name, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in lora["targets"])
    ]
    analytic = sum(lora["rank"] * (m.in_features + m.out_features) for m in targeted)
    model, shape = gpu_hours.network({**config, "model": {**config["model"], "pipeline": "no/such/dir"}}, "meta")
    trained = sum(p.numel() for p in model.parameters())
    assert len(targeted) == 16 * 2 * 4  # 16 transformer blocks x (self + cross attention) x 4 projections
    assert trained == analytic
    assert abs(trained - 25.5e6) < 0.1e6
    assert sum(b.numel() for b in model.unet.buffers()) == sum(p.numel() for p in base.parameters())
    assert shape == (4, 32, 32)


def test_local_pipeline_configs_and_lora_training_cost(gpu_hours, tmp_path):
    """A local pipeline directory's configs are what is counted; a LoRA training step costs < 3 forward passes."""
    config = overlay("latent")
    miniature = gpu_hours.latent_architecture(config)
    assert miniature["text"] == (gpu_hours.MAX_TOKENS, 32)
    for part, settings in (
        ("unet", {**miniature["unet"], "cross_attention_dim": 48}),
        ("vae", {**miniature["vae"], "sample_size": 32}),
        ("text_encoder", {"max_position_embeddings": 7, "hidden_size": 48}),
    ):
        (tmp_path / part).mkdir()
        (tmp_path / part / "config.json").write_text(json.dumps(settings))
    local = {**config, "model": {**config["model"], "pipeline": str(tmp_path)}}
    arch = gpu_hours.latent_architecture(local)
    assert arch["text"] == (7, 48) and arch["unet"]["cross_attention_dim"] == 48
    cost = gpu_hours.measure_model(local, batch=2, cpu=False)
    assert cost["input_shape"] == (4, 16, 16)  # the 32-px VAE's latents
    assert cost["cpu_seconds_per_step"] is None
    assert 0 < cost["trained"] < cost["params"]
    assert 1.5 < cost["train_flops"] / cost["forward_flops"] < 2.5
    assert cost["encode_flops"] > 0 and cost["decode_flops"] > 0
    rows = {stage: passes for stage, _, passes, _ in gpu_hours.stage_passes(local, cost)}
    assert "base_pipeline" not in rows and rows["encode"] > 0
    s = local["sample"]
    assert rows["sample"] > 2 * s["n_generated"] * s["num_inference_steps"]  # guidance doubles the passes
