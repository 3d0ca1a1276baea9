"""Class-conditional diffusion: DDPM training of a DiT or DiMR denoiser, DDIM sampling with guidance, DiffFit.

Implements DiT (Peebles & Xie 2023), DiffFit (Xie et al. 2023) and DiMR with TD-LN (Liu et al. 2024) on top of
DDPM/DDIM (Ho et al. 2020; Song et al. 2021) and classifier-free guidance (Ho & Salimans 2022).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from modules.base import VisionModule
from modules.components.backbones import load_state_dict_strict
from modules.components.checkpoints import read_state_dict
from modules.components.diffusion import IdentityAutoencoder, NoiseSchedule, ddim_sample, guided_eps, q_sample
from modules.components.dimr import DiMR
from modules.components.dit import DiT, difffit_parameter_names, trainable_fraction
from modules.components.errors import ConfigError
from modules.components.frechet import load_feature_classifier
from modules.components.masking import fixed_generator
from modules.components.optim import OptimConfig

ARCHITECTURES = ("dit", "dimr")
METHODS = ("full", "difffit")


class DiffusionModule(VisionModule):
    """DDPM noise-prediction training of a class-conditional denoiser; DDIM + EMA weights for sampling.

    Inputs are expected in [-1, 1] (the configs set the data's ``mean``/``std`` to 0.5). An optional
    ``autoencoder`` (``encode``/``decode``, ``latent_channels``, ``downsample``) moves diffusion to its latent
    space; the default is the identity (pixel space). Validation/test log ``val/loss`` and, with a
    ``feature_classifier``, ``val/fd_classifier`` (Frechet distance in that classifier's features, not
    Inception-FID) and ``val/sample_acc`` (its accuracy on class-conditional samples).

    Args:
        architecture: ``dit`` or ``dimr``.
        num_classes: classes (linked from the data); label ``num_classes`` is the null label.
        image_size: image side (linked from the data).
        denoiser_kwargs: extra arguments of :class:`DiT` / :class:`DiMR` (``dim``, ``depth``, ``patch_size``...).
        schedule: ``linear`` or ``cosine`` noise schedule.
        timesteps: diffusion steps T.
        label_dropout: probability of training with the null label (enables classifier-free guidance).
        method: ``full`` (train everything; from scratch without ``init_checkpoint``) or ``difffit``.
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
        optim: optimizer and schedule.
    """

    def __init__(
        self,
        architecture: str = "dit",
        num_classes: int = 10,
        image_size: int = 32,
        denoiser_kwargs: dict | None = None,
        schedule: str = "linear",
        timesteps: int = 1000,
        label_dropout: float = 0.1,
        method: str = "full",
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
        optim: OptimConfig | None = None,
    ):
        super().__init__(num_classes=num_classes, image_size=image_size, optim=optim)
        if architecture not in ARCHITECTURES:
            raise ConfigError(f"unknown diffusion architecture '{architecture}': pick one of {', '.join(ARCHITECTURES)}")
        if method not in METHODS:
            raise ConfigError(f"unknown diffusion method '{method}': pick one of {', '.join(METHODS)}")
        if not 0 <= label_dropout < 1:
            raise ConfigError(f"label_dropout {label_dropout} must be in [0, 1): 0.1 is the usual value")
        if classifier_classes is not None and len(classifier_classes) != num_classes:
            raise ConfigError(f"classifier_classes has {len(classifier_classes)} entries for {num_classes} classes: "
                              "give the classifier's class index of every class")
        self.save_hyperparameters(ignore=["autoencoder"])
        self.method, self.label_dropout, self.clip_denoised = method, label_dropout, clip_denoised
        self.sample_steps, self.guidance_scale, self.eta = sample_steps, guidance_scale, eta
        self.eval_samples_per_class = eval_samples_per_class
        self.autoencoder = (autoencoder or IdentityAutoencoder()).requires_grad_(False)
        kwargs = dict(input_size=image_size // self.autoencoder.downsample, in_channels=self.autoencoder.latent_channels,
                      num_classes=num_classes, **(denoiser_kwargs or {}))
        if architecture == "dit":
            self.denoiser = DiT(residual_scales=method == "difffit", **kwargs)
        else:
            self.denoiser = DiMR(timesteps=timesteps, **kwargs)
        self.schedule = NoiseSchedule(schedule, timesteps)
        if init_checkpoint:
            self._load_pretrained(init_checkpoint)
        elif method == "difffit":
            warnings.warn("DiffFit on a randomly initialised denoiser: set init_checkpoint", stacklevel=2)
        if method == "difffit":
            self.denoiser.requires_grad_(False)
            for name in difffit_parameter_names(self.denoiser):
                self.denoiser.get_parameter(name).requires_grad_(True)
        self.ema = ModelEmaV3(self.denoiser, decay=ema_decay, use_warmup=True).requires_grad_(False) if ema_decay else None
        # Evaluation network: not trained and not checkpointed (rebuilt from feature_classifier), so kept out of
        # the module tree; moved to the device when used.
        self.__dict__["frechet"] = None
        if feature_classifier:
            classifier = load_feature_classifier(feature_classifier)
            self.__dict__["frechet"] = FrechetInceptionDistance(feature=classifier, reset_real_features=True)
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
            raise ConfigError(f"{err}; set model.architecture and model.denoiser_kwargs to those of the "
                              "pretrained run") from None

    # --- the small interface used by callbacks, tools and benchmarks -----------------------------
    def optimizer_root(self) -> nn.Module:
        return self.denoiser

    def trainable_percent(self) -> float:
        trainable, total = trainable_fraction(self.denoiser)
        return 100.0 * trainable / total

    def diffusion_loss(self, latents: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise-prediction MSE at uniformly drawn timesteps."""
        t = torch.randint(0, self.schedule.timesteps, (latents.shape[0],), device=latents.device, generator=generator)
        noise = torch.randn(latents.shape, device=latents.device, generator=generator)
        eps = self.denoiser(q_sample(latents, t, noise, self.schedule), t, labels)
        return F.mse_loss(eps, noise)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, steps: int | None = None, guidance_scale: float | None = None,
               eta: float | None = None, generator: torch.Generator | None = None, use_ema: bool = True) -> torch.Tensor:
        """Class-conditional DDIM samples in [-1, 1], (B,) labels -> (B, C, H, W)."""
        net = self.ema.module if use_ema and self.ema is not None else self.denoiser
        was_training = net.training
        net.eval()
        side = self.image_size // self.autoencoder.downsample
        noise = torch.randn((len(labels), self.autoencoder.latent_channels, side, side), device=labels.device, generator=generator)
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        eps_fn = guided_eps(net, labels, self.num_classes, scale)
        latents = ddim_sample(eps_fn, noise, self.schedule, steps or self.sample_steps, self.eta if eta is None else eta,
                              generator, clip=1.0 if self.clip_denoised else None)
        net.train(was_training)
        return self.autoencoder.decode(latents).clamp(-1, 1)

    # --- Lightning -----------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        trainable, total = trainable_fraction(self.denoiser)
        if self.trainer.is_global_zero:
            print(f"diffusion: {self.hparams.architecture} ({self.method}) trains {trainable:,} of {total:,} "
                  f"denoiser parameters ({100 * trainable / total:.2f}%)")

    def training_step(self, batch, batch_idx):
        images, labels = batch
        drop = torch.rand(labels.shape, device=labels.device) < self.label_dropout
        labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        loss = self.diffusion_loss(self.autoencoder.encode(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/trainable_pct", self.trainable_percent(), on_step=False, on_epoch=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.update(self.denoiser, step=self.global_step)

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        stage = "test" if self.trainer.testing else "val"
        loss = self.diffusion_loss(self.autoencoder.encode(images), labels, fixed_generator(images.device, batch_idx))
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=True)
        if self.frechet is not None and not self.trainer.sanity_checking:
            self.frechet.to(self.device).update(images, real=True)

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
        frechet = self.frechet.to(self.device)
        frechet.update(samples, real=False)
        distance = float(frechet.compute()) if int(frechet.real_features_num_samples) > 1 else float("nan")
        frechet.reset()
        predicted = frechet.inception.logits(samples).argmax(dim=-1)
        accuracy = (predicted == self.classifier_classes[labels]).float().mean().item()
        return {f"{stage}/fd_classifier": distance, f"{stage}/sample_acc": accuracy}
