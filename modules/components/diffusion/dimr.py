"""DiMR: a multi-resolution diffusion denoiser with time-dependent LayerNorm (Liu et al. 2024, "Alleviating
Distortion in Image Generation via Multi-Resolution Diffusion Models"; reference: qihao067/DiMR).

A transformer stage refines coarse tokens at the lowest resolution; ConvNeXt-style stages refine the features
at each finer resolution (2x per stage). Every stage sees the noisy input at its own resolution, reads the
concatenation of *all* block outputs of the stage below (LayerNorm, pixel shuffle, LayerNorm), has U-ViT-style
long skips between its first and last blocks, and emits its own noise prediction: the loss is a weighted sum
over resolutions (:func:`multiresolution_loss`); sampling uses the highest. The timestep enters only through
TD-LN; the class enters as one extra token of the transformer.
"""

from __future__ import annotations

import math

import torch
from timm.layers import Attention, SwiGLU
from torch import nn

from modules.components.diffusion.gaussian import NoiseSchedule
from modules.components.errors import ConfigError


class TDLayerNorm(nn.LayerNorm):
    """TD-LN: LayerNorm whose scale and shift are time-dependent parameters, as the reference's.

    Each of scale and shift is ``p(c) = p_1 + sigmoid((1 + w) c + b) * (p_0 - p_1)`` with per-channel endpoints
    p_0, p_1 and per-channel mixing parameters w, b of its own; the time condition c comes from
    :func:`time_condition` (default the reference's linear map of the time step onto (-1, 1]). At
    initialisation p_0 = p_1 (1 for the scale, 0 for the shift), so the norm starts time-independent.

    Args:
        dim: normalised (last) dimension.
        eps: LayerNorm epsilon (the reference's 1e-5).
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__(dim, eps=eps, elementwise_affine=False)
        for name, init in (("scale", 1.0), ("shift", 0.0)):
            self.register_parameter(f"{name}_0", nn.Parameter(torch.full((dim,), init)))
            self.register_parameter(f"{name}_1", nn.Parameter(torch.full((dim,), init)))
            self.register_parameter(f"{name}_mix_weight", nn.Parameter(torch.zeros(dim)))
            self.register_parameter(f"{name}_mix_bias", nn.Parameter(torch.zeros(dim)))

    def _value(self, name: str, condition: torch.Tensor) -> torch.Tensor:
        weight = 1 + getattr(self, f"{name}_mix_weight")
        mix = torch.sigmoid(condition[:, None] * weight + getattr(self, f"{name}_mix_bias"))  # (B, D)
        end = getattr(self, f"{name}_1")
        return end + mix * (getattr(self, f"{name}_0") - end)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """x (B, ..., D), condition (B,) time condition (:func:`time_condition`)."""
        shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
        scale, shift = self._value("scale", condition).view(shape), self._value("shift", condition).view(shape)
        return super().forward(x) * scale + shift


class TDTransformerBlock(nn.Module):
    """Pre-norm transformer block with TD-LN norms and a gated GELU MLP, (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.norm1 = TDLayerNorm(dim)
        self.attn = Attention(dim, num_heads=heads, qkv_bias=False)
        self.norm2 = TDLayerNorm(dim)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x, condition))
        return x + self.mlp(self.norm2(x, condition))


class TDConvBlock(nn.Module):
    """ConvNeXt-style block: a 7x7 depthwise-conv branch, then a TD-LN + gated-MLP branch, (B, H, W, C) channel-last."""

    def __init__(self, dim: int, mlp_ratio: float = 2.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = TDLayerNorm(dim)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        x = x + self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(self.norm(x, condition))


class Stage(nn.Module):
    """One resolution: input stem + learned positions (+ the upsampled lower stage), blocks with long skips, output.

    ``forward`` returns this stage's noise prediction (B, C, side, side) and the channel concatenation of its input
    and every block output (B, side, side, D * (blocks + 1)) for the next stage.
    """

    def __init__(self, blocks: list[nn.Module], dim: int, in_channels: int, stride: int, side: int,
                 lowres_dim: int | None = None):
        super().__init__()
        if len(blocks) % 2 == 0:
            raise ValueError("a DiMR stage has an odd number of blocks (in, middle, out)")
        self.stem = nn.Conv2d(in_channels, dim, stride, stride=stride)
        self.pos_embed = nn.Parameter(torch.zeros(1, side, side, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.up_norm_in = TDLayerNorm(lowres_dim) if lowres_dim else None
        self.up_linear = nn.Linear(lowres_dim, 4 * dim) if lowres_dim else None
        self.up_norm_out = TDLayerNorm(dim) if lowres_dim else None
        self.blocks = nn.ModuleList(blocks)
        self.skip_denses = nn.ModuleList(nn.Linear(2 * dim, dim) for _ in range(len(blocks) // 2))
        self.out_norm = TDLayerNorm(dim)
        self.out_conv = nn.Conv2d(dim, in_channels, 3, padding=1)

    def upsample(self, lowres: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """(B, h, w, Dl) -> LayerNorm, Linear to 4D, pixel shuffle 2x, LayerNorm -> (B, 2h, 2w, D)."""
        x = self.up_linear(self.up_norm_in(lowres, condition))
        batch, height, width, channels = x.shape
        x = x.reshape(batch, height, width, 2, 2, channels // 4).transpose(2, 3)
        return self.up_norm_out(x.reshape(batch, 2 * height, 2 * width, channels // 4), condition)

    def forward(self, images: torch.Tensor, condition: torch.Tensor, lowres: torch.Tensor | None = None,
                class_token: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(images).permute(0, 2, 3, 1) + self.pos_embed  # (B, side, side, D)
        if lowres is not None:
            x = x + self.upsample(lowres, condition)
        batch, side, _, dim = x.shape
        tokens = isinstance(self.blocks[0], TDTransformerBlock)
        if tokens:
            x = x.reshape(batch, side * side, dim)
            if class_token is not None:
                x = torch.cat([class_token[:, None], x], dim=1)  # (B, 1 + N, D)
        half = len(self.blocks) // 2
        outputs, skips = [x], []
        for block in self.blocks[:half]:
            x = block(x, condition)
            outputs.append(x)
            skips.append(x)
        x = self.blocks[half](x, condition)
        outputs.append(x)
        for dense, block in zip(self.skip_denses, self.blocks[half + 1:]):
            x = block(dense(torch.cat([x, skips.pop()], dim=-1)), condition)
            outputs.append(x)
        if tokens:
            first = 1 if class_token is not None else 0
            outputs = [out[:, first:].reshape(batch, side, side, dim) for out in outputs]
            x = outputs[-1]
        prediction = self.out_conv(self.out_norm(x, condition).permute(0, 3, 1, 2))  # (B, C, side, side)
        return prediction, torch.cat(outputs, dim=-1)


TIME_INPUTS = ("timestep", "log_snr")


def time_condition(t: torch.Tensor, timesteps: int, time_input: str = "timestep",
                   log_snr: torch.Tensor | None = None) -> torch.Tensor:
    """TD-LN's time condition c for 0-based steps ``t`` (B,) of a ``timesteps``-step discrete schedule.

    ``timestep`` (default): the reference's ``train.py`` (qihao067/DiMR), both its training loss (``LSimple``)
    and its DPM-Solver sampling path, computes ``(n / 1000) * 8 - 4`` from the 1-based step n = t + 1 of its
    1000-step schedule and TD-LN divides by 4: c = 2 (t + 1) / T - 1, linear in t, from 2/T - 1 (least noise)
    to 1 (pure noise), whatever the schedule. ``log_snr``: log-SNR(t) / 4 of the schedule (``log_snr``, the
    schedule's buffer), what the reference's continuous-time ``sde.py`` path feeds and what visionlab fed
    before; it is not linear in t and runs the other way (+2.3 to -2.5 on the linear schedule), so checkpoints
    trained with one do not condition correctly with the other.
    """
    if time_input == "timestep":
        return (t.float() + 1) / timesteps * 2 - 1
    if time_input == "log_snr":
        return log_snr[t] / 4
    raise ConfigError(f"DiMR time_input must be one of {TIME_INPUTS}, not {time_input!r}")


def odd(count: int) -> int:
    """The reference's block count for a stage of ``count`` blocks: count // 2 * 2 + 1."""
    return count // 2 * 2 + 1


class DiMR(nn.Module):
    """Class-conditional multi-resolution denoiser: (x_t, t, label) -> noise predictions, lowest resolution first.

    Args:
        input_size: side of the (square) input.
        in_channels: input (and output) channels.
        num_classes: classes; label ``num_classes`` is the null class for classifier-free guidance.
        patch_size: patch side of the lowest-resolution transformer (a power of 2: one conv stage per 2x).
        dim: transformer width; conv stages halve it at each finer resolution (at least 16).
        depth: transformer blocks (rounded to odd, ``depth // 2 * 2 + 1``, as the reference's stages).
        heads: attention heads.
        conv_depth: conv blocks per finer-resolution stage (rounded to odd the same way).
        mlp_ratio: gated-MLP hidden width / dim (the reference's 2).
        schedule: the noise schedule of the diffusion (TD-LN reads its log-SNR with ``time_input="log_snr"``);
            must match the module's.
        timesteps: diffusion steps T of that schedule (TD-LN's time scale).
        time_input: what TD-LN is conditioned on (:func:`time_condition`): ``timestep`` (default, the
            reference's ``train.py``: the step mapped linearly onto (-1, 1]) or ``log_snr`` (log-SNR / 4, the
            reference's continuous-time ``sde.py`` and visionlab's earlier input; for its checkpoints).
        resolution_weights: loss weight of each resolution, lowest first; default the reference's [1/4, 1] for
            two resolutions, extended by a factor 1/4 per halving for more.
    """

    learn_sigma = False  # the reference predicts the noise only

    def __init__(self, input_size: int = 32, in_channels: int = 3, num_classes: int = 10, patch_size: int = 4,
                 dim: int = 128, depth: int = 4, heads: int = 4, conv_depth: int = 1, mlp_ratio: float = 2.0,
                 schedule: str = "linear", timesteps: int = 1000, resolution_weights: list[float] | None = None,
                 time_input: str = "timestep"):
        super().__init__()
        if time_input not in TIME_INPUTS:
            raise ConfigError(f"DiMR time_input must be one of {TIME_INPUTS}, not {time_input!r}")
        levels = int(math.log2(patch_size))
        if 2**levels != patch_size or input_size % patch_size:
            raise ConfigError(f"DiMR patch_size {patch_size} must be a power of 2 dividing input_size {input_size}")
        weights = resolution_weights or [4.0 ** -(levels - i) for i in range(levels + 1)]
        if len(weights) != levels + 1:
            raise ConfigError(f"DiMR with patch_size {patch_size} predicts at {levels + 1} resolutions: give "
                              f"{levels + 1} resolution_weights, not {len(weights)}")
        self.in_channels, self.out_channels, self.loss_weights = in_channels, in_channels, list(weights)
        self.schedule_kind, self.timesteps, self.time_input = schedule, timesteps, time_input
        self.register_buffer("log_snr", NoiseSchedule(schedule, timesteps).log_snr, persistent=False)
        self.y_embedder = nn.Embedding(num_classes + 1, dim)
        dims = [dim] + [max(16, dim // 2 ** (i + 1)) for i in range(levels)]
        stages, lowres_dim = [], None
        for level, width in enumerate(dims):
            if level == 0:
                blocks = [TDTransformerBlock(width, heads, mlp_ratio) for _ in range(odd(depth))]
            else:
                blocks = [TDConvBlock(width, mlp_ratio) for _ in range(odd(conv_depth))]
            stride = patch_size // 2**level
            stages.append(Stage(blocks, width, in_channels, stride, input_size // stride, lowres_dim))
            lowres_dim = width * (len(blocks) + 1)
        self.stages = nn.ModuleList(stages)
        for module in self.modules():  # the reference's Linear / Embedding init
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
        condition = time_condition(t, self.timesteps, self.time_input, self.log_snr)  # (B,)
        class_token = self.y_embedder(labels)  # (B, D)
        predictions, lowres = [], None
        for index, stage in enumerate(self.stages):
            prediction, lowres = stage(x, condition, lowres, class_token if index == 0 else None)
            predictions.append(prediction)  # (B, C, side_i, side_i)
        return predictions


def multiscale_targets(noise: torch.Tensor, sides: list[int]) -> list[torch.Tensor]:
    """The target noise at each side: r x r block sums divided by r (the reference's scale correction keeps white
    noise at unit variance; a plain average would shrink it by r)."""
    targets = []
    for side in sides:
        ratio = noise.shape[-1] // side
        targets.append(noise if ratio == 1 else nn.functional.avg_pool2d(noise, ratio) * ratio)
    return targets


def multiresolution_loss(predictions: list[torch.Tensor], noise: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """sum_i w_i * mean-square(prediction_i - target_i), averaged over the batch."""
    targets = multiscale_targets(noise, [p.shape[-1] for p in predictions])
    return sum(w * (p - target).square().mean() for w, p, target in zip(weights, predictions, targets))
