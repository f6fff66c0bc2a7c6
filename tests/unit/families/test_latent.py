"""The latent family (families/latent.py, latent_miniature.py) on a tiny base pipeline that the test pretrains for a
few steps and saves with save_pretrained in a temp dir, then reads back through the local-directory code path."""

import logging

import numpy as np
import pytest
import torch

from workflow_scripts.core.common import NonFiniteError, generator, load_torch, save_torch
from workflow_scripts.core.data import load_digits_images
from workflow_scripts.families import latent, latent_miniature
from workflow_scripts.families.ddpm import alphas_cumprod, measure_loss
from workflow_scripts.stages.gradients import JOURNEY_STREAM, journey_gradients, journey_steps, per_example_gradients

DIFFUSION = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}


def tiny_config(**train):
    return {
        "seeds": {"train": 2, "sample": 3, "split": 0},
        "data": {"dataset": "digits", "n_train": 12, "n_heldout": 2},
        "diffusion": dict(DIFFUSION),
        "base": {"vae_steps": 3, "unet_steps": 3, "vae_channels": [8, 16], "unet_channels": [8, 16], "text_width": 8},
        "model": {"family": "latent", "lora": {"rank": 2, "alpha": 2}, "caption_dropout": 0.1},
        "train": {
            "steps": 6,
            "batch_size": 8,
            "lr": 0.01,
            "weight_decay": 1e-6,
            "warmup_fraction": 0.1,
            "grad_clip": 1.0,
            "resume_every": 3,
            **train,
        },
        "compute": {"device": "cpu", "threads": 1},
        "sample": {"scheduler": "ddim", "num_inference_steps": 3, "guidance_scale": 3.0, "n_generated": 3},
    }


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    images, labels = load_digits_images()
    out = tmp_path_factory.mktemp("latent") / "base"
    latent_miniature.build_and_pretrain(tiny_config(), images[:64], labels[:64], out)
    return out


@pytest.fixture(scope="module")
def pool(pipeline_dir):
    """A pool of 12 digits as the encode stage writes it (latents, labels, captions, the pipeline and its digest)."""
    images, labels = load_digits_images()
    parts = latent.load_components(pipeline_dir)
    latents = latent.encode_images(parts["vae"], images[100:112], 8, "cpu", parts["vae"].config.sample_size)
    return {
        "train_images": latents,
        "train_labels": labels[100:112],
        "captions": np.asarray(latent_miniature.pool_captions()),
        "pipeline": np.asarray(str(pipeline_dir)),
        "pipeline_sha256": np.asarray(latent.pipeline_digest(pipeline_dir)),
    }


@pytest.fixture(scope="module")
def trained(pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "model.pt"
    latent.train_family_model(tiny_config(), pool, np.arange(12), 0, out)
    return out


def test_missing_pipeline_is_named_with_how_to_fetch_it(tmp_path):
    with pytest.raises(latent.PipelineMissing, match=r"nowhere.*model_index\.json.*huggingface-cli download"):
        latent.check_pipeline_dir(tmp_path / "nowhere")


def test_saved_pipeline_loads_with_the_scheduler_the_config_describes(pipeline_dir):
    parts = latent.load_components(pipeline_dir)
    latent.check_scheduler(parts["scheduler_config"], DIFFUSION, pipeline_dir)
    with pytest.raises(Exception, match="diffusion.beta_end"):
        latent.check_scheduler(parts["scheduler_config"], {**DIFFUSION, "beta_end": 0.012}, pipeline_dir)
    assert all(not p.requires_grad for p in parts["unet"].parameters())


def test_only_lora_parameters_are_trainable_and_only_they_change(pipeline_dir, trained):
    model, payload = latent.load_model(trained, tiny_config()["model"])
    names = [name for name, _ in model.named_parameters()]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert set(payload["state_dict"]) == set(names)  # the checkpoint holds the LoRA weights alone
    # LoRA B starts at zero: a trained B that is non-zero shows the adapters were actually trained
    assert any(p.abs().max() > 0 for n, p in model.named_parameters() if ".lora_B." in n)
    base = latent.load_components(pipeline_dir)["unet"].state_dict()
    frozen = {n.replace(".base_layer", ""): b for n, b in model.unet.named_buffers()}
    common = set(frozen) & set(base)
    assert len(common) == len(base)  # every base weight is still there, as a buffer
    assert all(torch.equal(frozen[n], base[n]) for n in common)  # bit-identical: fine-tuning touched none


def test_the_caption_changes_the_loss_and_the_gradients(pool, trained):
    model, _ = latent.load_model(trained, tiny_config()["model"])
    x = pool["train_images"][:2]
    measure = {"n_timesteps": 4, "n_noise": 1, "batch_size": 4}
    own = measure_loss(model, x, DIFFUSION, measure, 4, 0, "cpu", cond=np.array([3, 3]))
    other = measure_loss(model, x, DIFFUSION, measure, 4, 0, "cpu", cond=np.array([7, 7]))
    assert np.all(own != other)
    t = torch.tensor([100, 600])
    eps = torch.randn(2, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    a_bar = alphas_cumprod(DIFFUSION)
    images = torch.from_numpy(x[:1]).expand(2, *x.shape[1:]).contiguous()
    g = per_example_gradients(model, images, "loss", t, eps, a_bar, torch.tensor([3, 7]))
    assert g.shape == (2, sum(p.numel() for p in model.parameters()))
    assert not torch.allclose(g[0], g[1])  # the same image under two captions: the condition reaches the gradient


def test_per_example_lora_gradients_match_autograd_one_example_at_a_time(pool, trained):
    model, _ = latent.load_model(trained, tiny_config()["model"])
    x = torch.from_numpy(pool["train_images"][:3])
    cond = torch.tensor([1, 4, 1])
    t = torch.tensor([50, 400, 900])
    eps = torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(1))
    a_bar = alphas_cumprod(DIFFUSION)
    batched = per_example_gradients(model, x, "loss", t, eps, a_bar, cond)
    for i in range(3):
        model.zero_grad()
        a = a_bar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x[i : i + 1] + (1 - a).sqrt() * eps
        loss = (eps - model(x_t, t, cond[i].expand(3))).pow(2).flatten(1).mean(1).mean()
        loss.backward()
        reference = torch.cat([p.grad.flatten() for p in model.parameters()])
        # float32 vmap vs loop: the same sums in another order (relative error ~1e-6); a wrong caption, timestep or
        # parameter order gives O(1) differences
        torch.testing.assert_close(batched[i], reference, rtol=1e-4, atol=1e-6 * reference.abs().max().item())


def test_generated_queries_keep_their_prompt_and_do_not_depend_on_the_others(trained):
    config = tiny_config()
    model, payload = latent.load_model(trained, config["model"])
    every = latent.generate_images(model, payload["image_shape"], config, "cpu", 3)
    alone = latent.generate_images(model, payload["image_shape"], config, "cpu", 3, indices=[2])
    assert list(every["prompts"]) == ["a zero digit", "a one digit", "a two digit"]
    assert every["decoded"].shape == (3, 1, 16, 16) and np.abs(every["decoded"]).max() <= 1
    # the same seed and prompt: the same latent; batched vs alone rounds differently only in float32 (~1e-6)
    np.testing.assert_allclose(alone["images"][0], every["images"][2], atol=1e-4)


def test_fine_tuning_is_deterministic_for_a_seed(pool, trained, tmp_path, caplog):
    # a truncated resume file in the way is discarded (with a warning naming it), not an error
    resume = tmp_path / "again.resume.pt"
    save_torch({"identity": {}, "step": 3}, resume)
    resume.write_bytes(resume.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="workflow_scripts"):
        latent.train_family_model(tiny_config(), pool, np.arange(12), 0, tmp_path / "again.pt")
    assert f"discarding resume file {resume}" in caplog.text and not resume.exists()
    first = load_torch(trained)["state_dict"]
    again = load_torch(tmp_path / "again.pt")["state_dict"]
    assert all(torch.equal(first[k], again[k]) for k in first)  # same seed: bit-identical LoRA weights
    assert (tmp_path / "again.pt").read_bytes() == trained.read_bytes()  # and a byte-identical file
    latent.train_family_model(tiny_config(), pool, np.arange(12), 1, tmp_path / "other.pt")
    other = load_torch(tmp_path / "other.pt")["state_dict"]
    assert not all(torch.equal(first[k], other[k]) for k in first)  # replicate 1: another seed, other weights


def test_journey_follows_the_guided_latent_trajectory_and_its_prompt(trained):
    config = tiny_config()
    model, payload = latent.load_model(trained, config["model"])
    samples = latent.generate_images(model, payload["image_shape"], config, "cpu", 2)
    trajectories = torch.from_numpy(samples["trajectories"])
    timesteps, prompts = samples["timesteps"], torch.from_numpy(samples["labels"])
    a_bar, guidance = alphas_cumprod(DIFFUSION), 3.0
    steps = journey_steps(len(timesteps), 2)
    fast = journey_gradients(model, trajectories, timesteps, steps, range(2), 5, a_bar, prompts, guidance)
    # reference: one query and one step at a time, the guided prediction spelled out, autograd of the prompt's loss
    for q in range(2):
        reference = 0
        for s in steps:
            x_s, t = trajectories[q : q + 1, s], torch.tensor([int(timesteps[s])])
            with torch.no_grad():
                eps_u = model(x_s, t, torch.tensor([model.unconditional]))
                eps_c = model(x_s, t, prompts[q : q + 1])
                x0 = (x_s - (1 - a_bar[t]).sqrt() * (eps_u + guidance * (eps_c - eps_u))) / a_bar[t].sqrt()
            noise = torch.randn(*x_s.shape[1:], generator=generator(5, JOURNEY_STREAM, q, int(timesteps[s])))[None]
            model.zero_grad()
            x_t = a_bar[t].sqrt() * x0 + (1 - a_bar[t]).sqrt() * noise
            (noise - model(x_t, t, prompts[q : q + 1])).pow(2).mean().backward()
            reference = reference + torch.cat([p.grad.flatten() for p in model.parameters()])
        reference = reference / len(steps)
        # float32 vmap vs loop (~1e-6 relative); the unguided prediction, a clipped x0 or another prompt differ at O(1)
        torch.testing.assert_close(fast[q], reference, rtol=1e-4, atol=1e-6 * reference.abs().max().item())
    other = journey_gradients(model, trajectories, timesteps, steps, range(2), 5, a_bar, prompts.flip(0), guidance)
    assert not torch.allclose(other, fast)  # the prompt reaches the Journey features


def test_a_float16_base_keeps_float32_lora_weights_and_gradients(pipeline_dir, pool):
    model_cfg = tiny_config()["model"]
    full, _ = latent.make_denoiser(pipeline_dir, model_cfg, pool["captions"], 0, "cpu")
    half, _ = latent.make_denoiser(pipeline_dir, {**model_cfg, "base_dtype": "float16"}, pool["captions"], 0, "cpu")
    assert {b.dtype for b in half.unet.buffers() if b.is_floating_point()} == {torch.float16}
    assert {p.dtype for p in half.parameters()} == {torch.float32}  # trainable LoRA weights stay float32
    for p in half.parameters():  # B = 0 at initialisation: give the LoRA branch a value to differentiate through
        p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    full.load_state_dict(dict(half.named_parameters()), strict=False)
    x = torch.from_numpy(pool["train_images"][:4])
    t, cond = torch.tensor([10, 300, 600, 900]), torch.from_numpy(pool["train_labels"][:4])
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    a_bar = alphas_cumprod(DIFFUSION)
    grads, losses = [], []
    for model in (full, half):
        model.zero_grad()
        a = a_bar[t].view(-1, 1, 1, 1)
        prediction = model(a.sqrt() * x + (1 - a).sqrt() * eps, t, cond)
        assert prediction.dtype == torch.float32
        loss = (eps - prediction).pow(2).mean()
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[1].dtype == torch.float32
    # float16 rounds each activation to ~5e-4 relative: the loss and the gradient direction agree to ~1e-2; a base
    # left in float32, a LoRA branch dropped or a wrong cast would give exact equality or an O(1) difference
    assert losses[0] != losses[1] and abs(losses[1] - losses[0]) < 2e-2 * losses[0]
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


def test_fine_tuning_on_a_float16_base_trains_the_lora_weights(pool, tmp_path):
    config = tiny_config()
    config["model"] = {**config["model"], "base_dtype": "float16"}
    latent.train_family_model(config, pool, np.arange(12), 0, tmp_path / "half.pt")
    model, _ = latent.load_model(tmp_path / "half.pt", config["model"])
    assert model.base_dtype == torch.float16
    lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    # B starts at 0: non-zero, finite B means the scaled, unscaled and clipped steps reached the LoRA weights
    assert all(torch.isfinite(p).all() for p in lora_b) and any(p.abs().max() > 0 for p in lora_b)


def test_fine_tuning_stops_at_the_first_non_finite_loss(pool, tmp_path):
    """A learning rate far too high: the LoRA fine-tuning stops at the first NaN or infinite loss, naming the step and
    train.lr, and writes no model."""
    out = tmp_path / "diverged.pt"
    with pytest.raises(NonFiniteError, match=r"diverged\.pt: the training loss is .* at step \d+ of 20") as error:
        latent.train_family_model(tiny_config(lr=1e8, steps=20, resume_every=20), pool, np.arange(12), 0, out)
    assert "train.lr = 1e+08" in str(error.value)
    assert not out.exists()
