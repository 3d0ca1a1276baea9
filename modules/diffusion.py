"""Class-conditional diffusion: DDPM training of a DiT or DiMR denoiser, DDIM sampling with guidance, DiffFit.

Implements DiT (Peebles & Xie 2023), DiffFit (Xie et al. 2023) and DiMR with TD-LN (Liu et al. 2024) on top of
DDPM/DDIM (Ho et al. 2020; Song et al. 2021) and classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from modules.base import VisionModule
from modules.components.backbones import load_state_dict_strict
from modules.components.batches import named_batch
from modules.components.checkpoints import read_state_dict
from modules.components.diffusion.difffit import DiffFit
from modules.components.diffusion.gaussian import (IdentityAutoencoder, NoiseSchedule, ddim_sample, ddpm_sample, guided_eps,
                                          q_sample, split_output, vlb_terms)
from modules.components.diffusion.dimr import multiresolution_loss
from modules.components.diffusion.dit import DiT, trainable_fraction
from modules.components.errors import ConfigError
from modules.components.diffusion.frechet import load_feature_classifier
from modules.components.frozen import Frozen
from modules.components.mim.masking import fixed_generator
from modules.components.optim import OptimConfig
from modules.components.parts import check_recorded, record

DenoiserFactory = Callable[[int, int, int], nn.Module]


class DiffusionModule(VisionModule):
    """DDPM noise-prediction training of a class-conditional denoiser; DDIM (or DDPM) + EMA weights for sampling.

    Inputs are expected in [-1, 1] (the configs set the data's ``mean``/``std`` to 0.5). An optional
    ``autoencoder`` (``encode``/``decode``, ``latent_channels``, ``downsample``) moves diffusion to its latent
    space, its latents multiplied by ``latent_scale`` (DiT scales SD-VAE latents by 0.18215); the default is the
    identity (pixel space). Validation/test log ``val/loss`` and, with a ``feature_classifier``,
    ``val/fd_classifier`` (Frechet distance in that classifier's features, not Inception-FID) and
    ``val/sample_acc`` (its accuracy on class-conditional samples).

    The denoiser returns eps (B, C, H, W), eps and the variance values (B, 2C, H, W) when its ``learn_sigma`` is
    true (loss: MSE + improved DDPM's L_vlb on the variance, the mean's gradient stopped), or a list of
    per-resolution eps predictions, lowest first, weighted by its ``loss_weights`` (DiMR).

    Args:
        denoiser: ``(input_size, in_channels, num_classes) -> nn.Module``; in YAML a ``class_path`` (``DiT`` or
            ``DiMR`` of ``modules.components``) with its ``init_args``. Default: ``DiT`` with its defaults.
        num_classes: classes (linked from the data); label ``num_classes`` is the null label.
        image_size: image side (linked from the data).
        schedule: ``linear`` or ``cosine`` noise schedule.
        timesteps: diffusion steps T.
        label_dropout: probability of training with the null label (enables classifier-free guidance).
        finetune: a fine-tuning recipe (:class:`DiffFit`) applied to the denoiser; ``None`` trains everything.
        init_checkpoint: a diffusion checkpoint to start from (its EMA weights when present).
        sample_steps: DDIM steps when sampling.
        guidance_scale: s in eps_u + s (eps_c - eps_u); 0 unconditional, 1 conditional.
        eta: DDIM noise (0 deterministic, 1 DDPM-like).
        ema_decay: EMA decay of the weights used for sampling; 0 disables the EMA.
        clip_denoised: clamp predicted x0 to [-1, 1] while sampling (pixel space).
        feature_classifier: ``ClassificationModule`` checkpoint for the distance and sample accuracy.
        classifier_classes: the classifier's class index of each label here (default: the same index).
        eval_samples_per_class: samples per class generated at the end of each validation.
        autoencoder: latent encode/decode hook (frozen); identity by default.
        latent_scale: factor applied to the autoencoder's latents (1/scale before decoding).
        optim: optimizer and schedule.
    """

    weight_decay_rule = "all"  # DiT train.py: AdamW(model.parameters(), weight_decay=0), one group

    def __init__(
        self,
        denoiser: DenoiserFactory | None = None,
        num_classes: int = 10,
        image_size: int = 32,
        schedule: str = "linear",
        timesteps: int = 1000,
        label_dropout: float = 0.1,
        finetune: DiffFit | None = None,
        init_checkpoint: str | None = None,
        sample_steps: int = 50,
        guidance_scale: float = 2.0,
        eta: float = 0.0,
        ema_decay: float = 0.999,
        clip_denoised: bool = True,
        feature_classifier: str | None = None,
        classifier_classes: list[int] | None = None,
        eval_samples_per_class: int = 10,
        autoencoder: nn.Module | None = None,
        latent_scale: float = 1.0,
        optim: OptimConfig | None = None,
    ):
        super().__init__(num_classes=num_classes, image_size=image_size, optim=optim)
        if not 0 <= label_dropout < 1:
            raise ConfigError(f"label_dropout {label_dropout} must be in [0, 1): 0.1 is the usual value")
        if classifier_classes is not None and len(classifier_classes) != num_classes:
            raise ConfigError(f"classifier_classes has {len(classifier_classes)} entries for {num_classes} classes: "
                              "give the classifier's class index of every class")
        for name, value in (("denoiser", denoiser), ("finetune", finetune), ("autoencoder", autoencoder)):
            check_recorded(value, f"model.{name}")
        # The CLI records its class_path dicts; objects passed from Python are recorded by the part contract
        # (a denoiser class or factory as unrecorded: such a checkpoint needs it passed again to load_from_checkpoint).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "is an instance of nn.Module": recorded just below
            self.save_hyperparameters()
        for name in ("denoiser", "finetune", "autoencoder"):
            if not isinstance(self.hparams.get(name), (dict, type(None))):
                self.hparams[name] = record(self.hparams[name])
        self.label_dropout, self.clip_denoised, self.latent_scale = label_dropout, clip_denoised, latent_scale
        self.sample_steps, self.guidance_scale, self.eta = sample_steps, guidance_scale, eta
        self.eval_samples_per_class = eval_samples_per_class
        self.autoencoder = (autoencoder or IdentityAutoencoder()).requires_grad_(False)
        self.schedule = NoiseSchedule(schedule, timesteps)
        self.denoiser = (denoiser or DiT)(image_size // self.autoencoder.downsample, self.autoencoder.latent_channels,
                                          num_classes)
        self.learn_sigma = bool(getattr(self.denoiser, "learn_sigma", False))
        own = (getattr(self.denoiser, "schedule_kind", schedule), getattr(self.denoiser, "timesteps", timesteps))
        if own != (schedule, timesteps):
            raise ConfigError(f"the denoiser is built for the {own[0]} schedule with {own[1]} steps but the model "
                              f"diffuses with {schedule} / {timesteps}: set the denoiser's schedule and timesteps to match")
        self.finetune = finetune
        if finetune is not None:
            finetune.add_scales(self.denoiser)
        if init_checkpoint:
            self._load_pretrained(init_checkpoint)
        elif finetune is not None:
            warnings.warn("DiffFit on a randomly initialised denoiser: set init_checkpoint", stacklevel=2)
        if finetune is not None:
            finetune.freeze(self.denoiser)
        self.ema = ModelEmaV3(self.denoiser, decay=ema_decay, use_warmup=True).requires_grad_(False) if ema_decay else None
        # The evaluation network is a child module (so it moves with the model), Frozen: never trained, in eval
        # mode and left out of the checkpoint (it is rebuilt from feature_classifier).
        self.frechet_metric = None
        if feature_classifier:
            classifier = load_feature_classifier(feature_classifier)
            self.frechet_metric = Frozen(FrechetInceptionDistance(feature=classifier, reset_real_features=True))
        self.register_buffer("classifier_classes", torch.tensor(classifier_classes or range(num_classes)), persistent=False)

    def _load_pretrained(self, path: str) -> None:
        """Denoiser weights of a diffusion checkpoint (EMA preferred); DiffFit's new gammas and a resized class
        embedding keep their fresh values."""
        state = read_state_dict(path)
        prefix = next((p for p in ("ema.module.", "denoiser.") if any(k.startswith(p) for k in state)), None)
        if prefix is None:
            raise ConfigError(f"{path} is not a diffusion checkpoint (no 'denoiser.*' weights): "
                              "pass a .ckpt written by visionlab fit with configs/diffusion/*.yaml")
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        own = self.denoiser.state_dict()
        for key, value in own.items():
            fresh = key.rsplit(".", 1)[-1].startswith("gamma_") and key not in state
            resized = key.startswith("y_embedder.") and key in state and state[key].shape != value.shape
            if fresh or resized:
                state[key] = value
        try:
            load_state_dict_strict(self.denoiser, state, f"checkpoint {path}")
        except (ConfigError, RuntimeError) as err:
            raise ConfigError(f"{err}; set model.denoiser (architecture class_path and init_args) to that of the "
                              "pretrained run") from None

    @property
    def frechet(self) -> FrechetInceptionDistance | None:
        """The Frechet distance metric over the feature classifier (None without one)."""
        return None if self.frechet_metric is None else self.frechet_metric.module

    # --- the small interface used by callbacks, tools and benchmarks -----------------------------
    def optimizer_root(self) -> nn.Module:
        return self.denoiser

    def trainable_percent(self) -> float:
        trainable, total = trainable_fraction(self.denoiser)
        return 100.0 * trainable / total

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(images) * self.latent_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents / self.latent_scale)

    def diffusion_losses(self, latents: torch.Tensor, labels: torch.Tensor,
                         generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``loss`` at uniformly drawn timesteps with its parts: ``mse`` (noise prediction; per resolution summed
        with the denoiser's weights for a multi-resolution one) and, with a learned variance, ``vb``."""
        t = torch.randint(0, self.schedule.timesteps, (latents.shape[0],), device=latents.device, generator=generator)
        noise = torch.randn(latents.shape, device=latents.device, generator=generator)
        x_t = q_sample(latents, t, noise, self.schedule)
        output = self.denoiser(x_t, t, labels)
        if isinstance(output, (list, tuple)):  # one prediction per resolution, lowest first
            mse = multiresolution_loss(list(output), noise, self.denoiser.loss_weights)
            return {"loss": mse, "mse": mse}
        eps, values = split_output(output, self.learn_sigma)
        mse = F.mse_loss(eps, noise)
        if values is None:
            return {"loss": mse, "mse": mse}
        vb = vlb_terms(self.schedule, latents, x_t, t, eps.detach(), values).mean()  # the mean learns from mse only
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def diffusion_loss(self, latents: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.diffusion_losses(latents, labels, generator)["loss"]

    def _highest_resolution(self, net: nn.Module) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        def predict(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            output = net(x, t, labels)
            return output[-1] if isinstance(output, (list, tuple)) else output

        return predict

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, steps: int | None = None, guidance_scale: float | None = None,
               eta: float | None = None, generator: torch.Generator | None = None, use_ema: bool = True,
               ddpm: bool = False) -> torch.Tensor:
        """Class-conditional samples in [-1, 1], (B,) labels -> (B, C, H, W): DDIM with ``steps`` steps, or with
        ``ddpm`` ancestral sampling over all T steps with the learned (else the posterior) variance."""
        net = self.ema.module if use_ema and self.ema is not None else self.denoiser
        was_training = net.training
        net.eval()
        side = self.image_size // self.autoencoder.downsample
        noise = torch.randn((len(labels), self.autoencoder.latent_channels, side, side), device=labels.device, generator=generator)
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        eps_fn = guided_eps(self._highest_resolution(net), labels, self.num_classes, scale, self.learn_sigma)
        clip = 1.0 if self.clip_denoised else None
        if ddpm:
            latents = ddpm_sample(eps_fn, noise, self.schedule, generator, clip=clip, learn_sigma=self.learn_sigma)
        else:
            latents = ddim_sample(eps_fn, noise, self.schedule, steps or self.sample_steps, self.eta if eta is None else eta,
                                  generator, clip=clip)
        net.train(was_training)
        return self.decode(latents).clamp(-1, 1)

    # --- Lightning -----------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        trainable, total = trainable_fraction(self.denoiser)
        if self.trainer.is_global_zero:
            recipe = type(self.finetune).__name__ if self.finetune is not None else "full"
            print(f"diffusion: {type(self.denoiser).__name__} ({recipe}) trains {trainable:,} of {total:,} "
                  f"denoiser parameters ({100 * trainable / total:.2f}%)")

    def training_step(self, batch, batch_idx):
        batch = named_batch(batch)
        images, labels = batch["image"], batch["label"]
        drop = torch.rand(labels.shape, device=labels.device) < self.label_dropout
        labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        losses = self.diffusion_losses(self.encode(images), labels)
        self.log("train/loss", losses["loss"], prog_bar=True)
        if "vb" in losses:
            self.log_dict({"train/mse": losses["mse"], "train/vb": losses["vb"]})
        self.log("train/trainable_pct", self.trainable_percent(), on_step=False, on_epoch=True)
        return losses["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.update(self.denoiser, step=self.global_step)

    def validation_step(self, batch, batch_idx):
        batch = named_batch(batch)
        images, labels = batch["image"], batch["label"]
        stage = "test" if self.trainer.testing else "val"
        losses = self.diffusion_losses(self.encode(images), labels, fixed_generator(images.device, batch_idx))
        self.log(f"{stage}/loss", losses["loss"], prog_bar=True, sync_dist=True)
        self.log(f"{stage}/mse", losses["mse"], sync_dist=True)
        if self.frechet is not None and not self.trainer.sanity_checking:
            self.frechet.update(images, real=True)

    def test_step(self, batch, batch_idx):
        return self.validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self.eval_samples_per_class < 1:
            return
        stage = "test" if self.trainer.testing else "val"
        per_class = self.eval_samples_per_class
        labels = torch.arange(self.num_classes, device=self.device).repeat_interleave(per_class)
        samples = self.sample(labels, generator=fixed_generator(self.device, 0))
        self.log_images("diffusion/samples", samples, nrow=per_class)  # one row per class
        if self.frechet is not None:
            self.log_dict(self.evaluate(samples, labels, stage), sync_dist=False)

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()

    def evaluate(self, samples: torch.Tensor, labels: torch.Tensor, stage: str = "val") -> dict[str, float]:
        """Frechet distance of ``samples`` to the real images seen this epoch, and the classifier's accuracy on them."""
        frechet = self.frechet
        frechet.update(samples, real=False)
        distance = float(frechet.compute()) if int(frechet.real_features_num_samples) > 1 else float("nan")
        frechet.reset()
        predicted = frechet.inception.logits(samples).argmax(dim=-1)
        accuracy = (predicted == self.classifier_classes[labels]).float().mean().item()
        return {f"{stage}/fd_classifier": distance, f"{stage}/sample_acc": accuracy}
