"""PEFT methods as small objects chosen by ``class_path`` (pure torch + timm, no Lightning).

Each method knows how to freeze and wrap a timm backbone (:meth:`PEFTMethod.bind`), which parameters it
trains (those it leaves with ``requires_grad``), its task state (:meth:`PEFTMethod.task_state`, what a task
file stores) and, where it can, how to merge into a plain timm model (:meth:`PEFTMethod.merge`)::

    method:
      class_path: modules.components.peft.methods.SSFTuning
      init_args: {init_std: 0.02}
"""

from __future__ import annotations

import copy

import torch
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from torch import nn

from modules.components.errors import ConfigError
from modules.components.peft.low_bit import QuantLinear, WeightQuantizer, task_storage_bytes
from modules.components.peft.layers import (Adapter, AdapterConfig, AdaptFormerBlock, ParallelAdapter, SequentialAdapter, insert_ssf,
                                     merge_ssf, mlp_sites, probe_forward, replace_submodule, residual_block_sites, vit_blocks,
                                     wrap_sites)
from modules.components.peft.lora import LoRALayer, lora_sites, merge_lora
from modules.components.peft.side_network import SideNetwork, backbone_intermediates
from modules.components.parts import Part, as_part


def classifier_name(backbone: nn.Module) -> str:
    """Dotted name of a timm model's classifier (``head``, ``fc``, ``head.fc``...)."""
    head = backbone.get_classifier()
    return next(name for name, module in backbone.named_modules() if module is head)


class PEFTMethod(Part):
    """Base: the backbone is frozen (and runs in eval mode), only the classifier head trains."""

    trains_backbone = False
    adds_modules = True  #: False: the trained backbone is already a plain timm model (merge is a copy)

    def bind(self, host) -> None:
        """Freeze ``host.backbone`` and wrap it in place (reads ``host.image_size``; ``host.num_classes`` for a
        method that builds its own head)."""
        backbone = host.backbone
        backbone.requires_grad_(False)
        self.wrap(backbone, host.image_size)
        backbone.get_classifier().requires_grad_(True)

    def wrap(self, backbone: nn.Module, image_size: int) -> None:
        """Insert the method's modules into the frozen backbone (none for a linear probe)."""

    def forward(self, backbone: nn.Module, extra: nn.Module | None, images: torch.Tensor) -> torch.Tensor:
        return backbone(images)  # (B, num_classes)

    def task_state(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
        """``(tensors, packed)`` under ``model``'s names: fp32 trained tensors, and bit-packed low-bit weights."""
        quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.weight.requires_grad}
        tensors = {}
        for name, p in model.named_parameters():
            module_name, _, leaf = name.rpartition(".")
            if p.requires_grad and not (module_name in quantized and leaf in ("weight", "step_gain")):
                tensors[name] = p.detach().cpu().clone()
        return tensors, {name: module.pack() for name, module in quantized.items()}

    @torch.no_grad()
    def load_task_state(self, model: nn.Module, tensors: dict[str, torch.Tensor], packed: dict[str, dict]) -> None:
        """Load what :meth:`task_state` returned; every task tensor must be present with its shape."""
        expected_tensors, expected_packed = (set(d) for d in self.task_state(model))
        missing = (expected_tensors - set(tensors)) | (expected_packed - set(packed))
        unexpected = (set(tensors) - expected_tensors) | (set(packed) - expected_packed)
        if missing or unexpected:
            raise ConfigError(f"task file does not match the model: missing {sorted(missing)[:6]}, unexpected {sorted(unexpected)[:6]}")
        own = dict(model.named_parameters()) | dict(model.named_buffers())
        for name, value in tensors.items():
            if own[name].shape != value.shape:
                raise ConfigError(f"task tensor {name} has shape {tuple(value.shape)}, the model expects {tuple(own[name].shape)}")
            own[name].copy_(value)
        for name, entry in packed.items():
            model.get_submodule(name).load_packed(entry)

    def storage_bytes(self, model: nn.Module) -> int:
        """Bytes of the task state at its stated bits (low-bit weights packed, with their decode tensors)."""
        return task_storage_bytes(model)

    def merge(self, backbone: nn.Module) -> nn.Module:
        """A plain timm model computing what the wrapped backbone computes (a copy; the original is untouched):
        the copy itself for a method that inserts nothing (``adds_modules`` false), else the method's own merge."""
        if not self.adds_modules:
            return copy.deepcopy(backbone).eval()
        raise ConfigError(f"{type(self).__name__} adds modules to the backbone: it does not merge into a plain model")


class LinearProbe(PEFTMethod):
    """Linear probe: only the (new) head trains."""

    adds_modules = False

    def __init__(self):
        pass


class FullFineTune(PEFTMethod):
    """Full fine-tune baseline: every backbone weight trains; the task state is the whole backbone."""

    trains_backbone = True
    adds_modules = False

    def __init__(self):
        pass

    def bind(self, host) -> None:
        host.backbone.requires_grad_(True)

    def task_state(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
        backbone = model.get_submodule("backbone")
        return {f"backbone.{k}": v.detach().cpu().clone() for k, v in backbone.state_dict().items()}, {}

    def storage_bytes(self, model: nn.Module) -> int:
        return sum(v.numel() * v.element_size() for v in self.task_state(model)[0].values())


class SSFTuning(PEFTMethod):
    """SSF (Lian et al. 2022): per-channel scale and shift after every foldable op; merges into the weights.

    Args:
        init_std: scale ~ N(1, std), shift ~ N(0, std).
    """

    def __init__(self, init_std: float = 0.02):
        self.init_std = init_std

    def wrap(self, backbone: nn.Module, image_size: int) -> None:
        example = torch.zeros(1, 3, image_size, image_size)
        self.site_names = insert_ssf(backbone, exclude=(classifier_name(backbone),), init_std=self.init_std, example=example)

    def merge(self, backbone: nn.Module) -> nn.Module:
        return merge_ssf(copy.deepcopy(backbone)).eval()


def is_bias(name: str) -> bool:
    """Whether a parameter name is a bias term: its leaf is ``bias`` or ``<x>_bias`` (timm's BEiT/EVA/Swin-V2
    ``q_bias``/``v_bias``, a parallel ViT block's ``mlp_bias``). Additive attention tables are not: Swin's
    ``relative_position_bias_table``, LeViT's ``attention_biases``."""
    leaf = name.rpartition(".")[2]
    return leaf == "bias" or leaf.endswith("_bias")


class BitFit(PEFTMethod):
    """BitFit (Ben Zaken, Ravfogel, Goldberg 2022): only the backbone's bias terms (and the new head) train.

    Every parameter :func:`is_bias` names outside the classifier trains: the linears' and convs' biases and
    the normalisation layers' biases too (LayerNorm's, BatchNorm's beta; their scales stay frozen). Nothing is
    inserted, so the trained backbone is already a plain timm model (:meth:`merge` is a copy) and the task
    file holds only those biases and the head. A ResNet's convs have no bias, so its BatchNorm biases are what
    trains; a backbone with no bias outside its head is refused.

    The reference (``benzakenelad/BitFit``, ``GLUEvaluator._deactivate_relevant_gradients``) trains every BERT
    parameter whose name contains ``bias`` (``--bias-terms all``; a subset such as query/intermediate biases
    otherwise) and the whole classifier. visionlab differs: the bias is matched by the leaf name (a substring
    match would also train position-bias tables), no subset is offered, and the frozen backbone runs in eval
    mode as in every visionlab PEFT method (the reference trains BERT with its dropout on).
    """

    adds_modules = False

    def __init__(self):
        pass

    def wrap(self, backbone: nn.Module, image_size: int) -> None:
        head = classifier_name(backbone) + "."
        self.bias_names = [n for n, _ in backbone.named_parameters() if is_bias(n) and not n.startswith(head)]
        if not self.bias_names:
            raise ConfigError(f"BitFit trains bias terms, but {type(backbone).__name__} has none outside its classifier: "
                              "pick a backbone with biases (or norms with biases), or another PEFT method")
        for name in self.bias_names:
            backbone.get_parameter(name).requires_grad_(True)


class LoRATuning(PEFTMethod):
    """LoRA (Hu et al. 2021) on the backbone's linears and convs (LoCon's conv form); merges into the weights.

    Args:
        rank: rank of each update ``B A``.
        alpha: updates are scaled by ``alpha / rank``.
        dropout: dropout on the low-rank branch's input.
        targets: module-name patterns to wrap (fnmatch; a bare name matches as a suffix: ``[qkv, attn.proj,
            fc1, fc2]`` for a timm ViT); ``None``: every linear and ungrouped conv but the classifier (see
            :func:`modules.components.peft.lora.lora_sites`).
    """

    dora = False

    def __init__(self, rank: int = 8, alpha: float = 8.0, dropout: float = 0.0, targets: list[str] | None = None):
        if rank < 1:
            raise ConfigError(f"{type(self).__name__} rank {rank} must be at least 1")
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.targets = None if targets is None else list(targets)

    def wrap(self, backbone: nn.Module, image_size: int) -> None:
        self.site_names = lora_sites(backbone, self.targets, exclude=(classifier_name(backbone),))
        if not self.site_names:
            eligible = lora_sites(backbone, None, exclude=(classifier_name(backbone),))
            raise ConfigError(f"{type(self).__name__} targets {self.targets} match no linear/conv of "
                              f"{type(backbone).__name__}; its layers are named like {eligible[:4]}")
        for name in self.site_names:
            replace_submodule(backbone, name, LoRALayer(backbone.get_submodule(name), self.rank, self.alpha, self.dropout,
                                                        dora=self.dora))

    def merge(self, backbone: nn.Module) -> nn.Module:
        return merge_lora(copy.deepcopy(backbone)).eval()


class DoRATuning(LoRATuning):
    """DoRA (Liu et al. 2024): LoRA on the direction plus a trained magnitude per output channel; merges.

    Same arguments as :class:`LoRATuning`; see :mod:`modules.components.peft.lora` for the decomposition.
    """

    dora = True


class AdapterPlacement(Part):
    """Where ``AdapterTuning`` puts its adapters in a backbone, chosen by ``class_path``."""

    def insert(self, model: nn.Module, cfg: AdapterConfig, example: torch.Tensor) -> list[str]:
        """Wrap the adapter sites of ``model`` in place (``example``: one input, for channel counts); their names."""
        raise NotImplementedError


class ParallelPlacement(AdapterPlacement):
    """AdaptFormer's placement: an adapter beside each MLP branch.

    A timm ViT block becomes an :class:`AdaptFormerBlock` (the adapter reads the residual stream before
    ``norm2``, as AdaptFormer's code); other blocks with an ``mlp`` (ConvNeXt) get the adapter beside the MLP,
    fed its input. Blocks without an MLP (ResNet, the EfficientNet family) take :class:`SequentialPlacement`.
    """

    def insert(self, model: nn.Module, cfg: AdapterConfig, example: torch.Tensor) -> list[str]:
        blocks = vit_blocks(model)
        if blocks:
            for name, block in blocks:
                replace_submodule(model, name, AdaptFormerBlock(block, Adapter(block.norm2.normalized_shape[0], cfg)))
            return [name for name, _ in blocks]
        sites = mlp_sites(model)
        if not sites and (mobile_blocks(model) or residual_block_sites(model)):
            raise ConfigError(f"parallel adapters need blocks with an MLP (ViT, ConvNeXt): {type(model).__name__}'s blocks "
                              "have none; use placement modules.components.peft.methods.SequentialPlacement")
        return wrap_sites(model, sites, ParallelAdapter, cfg)


class SequentialPlacement(AdapterPlacement):
    """Houlsby/Pfeiffer placement: ``y + adapter(y)`` after each MLP (ViT, ConvNeXt), else after each ResNet
    residual block, or after each block of the EfficientNet family (:func:`insert_mobile_block_adapters`)."""

    def insert(self, model: nn.Module, cfg: AdapterConfig, example: torch.Tensor) -> list[str]:
        if mobile_blocks(model):
            return insert_mobile_block_adapters(model, cfg, example)
        return wrap_sites(model, mlp_sites(model) or residual_block_sites(model), SequentialAdapter, cfg)


class AdapterTuning(PEFTMethod):
    """Bottleneck adapters: AdaptFormer (fp32) or low-bit adapters (Jie et al. 2023) with a ``quantizer``.

    Args:
        dim: bottleneck width.
        scale: adapter output multiplier (AdaptFormer's s).
        placement: where the adapters go: :class:`ParallelPlacement` (AdaptFormer, the default) or
            :class:`SequentialPlacement` (ResNets and the EfficientNet family need it).
        bias: biases in the projections (the low-bit adapters' code has none).
        dropout: dropout after the activation.
        activation: timm activation name.
        quantizer: low-bit weights, e.g. ``modules.components.peft.low_bit.NormalQuantile`` (the paper's);
            ``None`` keeps fp32.
    """

    def __init__(self, dim: int = 8, scale: float = 0.1, placement: AdapterPlacement | None = None, bias: bool = True,
                 dropout: float = 0.1, activation: str = "relu", quantizer: WeightQuantizer | None = None):
        self.dim, self.scale, self.placement, self.bias = dim, scale, placement or ParallelPlacement(), bias
        self.dropout, self.activation, self.quantizer = dropout, activation, quantizer

    def wrap(self, backbone: nn.Module, image_size: int) -> None:
        cfg = AdapterConfig(self.dim, self.scale, self.bias, self.dropout, self.activation, self.quantizer)
        self.site_names = self.placement.insert(backbone, cfg, torch.zeros(1, 3, image_size, image_size))


class SideTuning(PEFTMethod):
    """Side-tuning: a light side network reads the frozen backbone's intermediate maps and holds the head.

    Simplified Hierarchical Side-Tuning (no meta tokens, no side stem): see
    :class:`modules.components.peft.side_network.SideNetwork`.

    Args:
        dim: side-stream channels.
        taps: backbone intermediates it reads (timm ``forward_intermediates`` indices; an int n = the last n).
    """

    def __init__(self, dim: int = 32, taps: int | list[int] = 4):
        self.dim = dim
        self.taps = taps if isinstance(taps, int) else list(taps)

    def bind(self, host) -> None:
        """Freezes ``host.backbone``, drops its head and sets ``host.side``, the side network holding the new one."""
        backbone, size = host.backbone, host.image_size
        backbone.requires_grad_(False)
        backbone.reset_classifier(0)
        with torch.no_grad():
            probe = backbone_intermediates(backbone.eval(), torch.zeros(1, 3, size, size), self.taps)
        host.side = SideNetwork([f.shape[1] for f in probe], self.dim, host.num_classes)

    def forward(self, backbone: nn.Module, extra: nn.Module | None, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = backbone_intermediates(backbone, images, self.taps)  # [(B, C_i, H_i, W_i)]
        return extra(features)


def mobile_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks of a timm EfficientNet-family model (MobileNetV2/V3, EfficientNet(-Lite), MixNet...).

    Their inverted-residual blocks (``blocks.<stage>.<index>``) have no ``mlp``, so ``insert_adapters``
    finds no site in them; other models give an empty list.
    """
    if not isinstance(model, (EfficientNet, MobileNetV3)):
        return []
    return [f"blocks.{i}.{j}" for i, stage in enumerate(model.blocks) for j in range(len(stage))]


def insert_mobile_block_adapters(model: nn.Module, cfg: AdapterConfig, example: torch.Tensor) -> list[str]:
    """Sequential adapters after every EfficientNet-family block, as ``insert_adapters`` does for ResNet blocks.

    Each block's output ``y`` (B, C, H, W) becomes ``y + adapter(y)``: a 1x1 bottleneck over the channels (the
    up-projection starts at zero, so the wrapped model starts as the plain one). The channel count of each
    block comes from one traced forward of ``example``.
    """
    names, channels = mobile_blocks(model), {}

    def record(name: str):
        def hook(module, inputs, output) -> None:  # returns None: the output stays as it is
            channels[name] = output.shape[1]
        return hook

    handles = [model.get_submodule(n).register_forward_hook(record(n)) for n in names]
    probe_forward(model, example, handles)
    for name in names:
        replace_submodule(model, name, SequentialAdapter(model.get_submodule(name), Adapter(channels[name], cfg, channel_dim=1)))
    return names


def build_method(spec: PEFTMethod | dict) -> PEFTMethod:
    """A method from itself or from its record (nested quantizer and placement records too), through the one
    allow-listed rebuild of :func:`modules.components.parts.build_part`."""
    return as_part(spec, PEFTMethod, "model.method")
