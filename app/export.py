"""``visionlab export``: a trained network as a plain timm safetensors file or an ONNX graph, with a JSON sidecar.

    visionlab export --checkpoint runs/classification/resnet18/checkpoints/last.ckpt --format safetensors --output model.safetensors
    visionlab export --checkpoint runs/peft/lora/checkpoints/last.ckpt --format onnx --output model.onnx

Works for every technique whose result is a backbone or a classifier: classification (and MIM fine-tunes, which
are classification runs), KD students, PEFT runs (merged into a plain timm model: SSF, LoRA, DoRA, linear
probe, full fine-tune), linear probes and CLIP's image tower. ``<output stem>.json`` says what the weights are
for (``architecture``, ``num_classes``, ``model_kwargs``, ``input_size``, ``mean``, ``std``) and how to load them
with timm alone::

    meta = json.load(open("model.json"))
    model = timm.create_model(meta["architecture"], pretrained=True, num_classes=meta["num_classes"],
                              pretrained_cfg_overlay=dict(meta["pretrained_cfg_overlay"], file="model.safetensors"),
                              **meta["model_kwargs"])

(the overlay repeats ``num_classes``: timm drops a classifier whose class count differs from its pretrained
config's.) Where the head is not timm's own (the linear probe's BatchNorm + Linear, CLIP's projection to the
shared embedding), the ONNX graph carries the whole network and the safetensors file the headless backbone
(``num_classes`` 0); the sidecar's ``head`` says so. ONNX files use the exporter's default opset for the installed
torch, take any batch size, and are checked against the torch outputs with onnxruntime before the command ends.
"""

from __future__ import annotations

import argparse
import inspect
import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from modules.components.checkpoints import allowlisted, load_checkpoint, read_state_dict
from modules.components.errors import ConfigError
from modules.components.files import write_atomic
from modules.components.transfer import PRETRAINED_KEYS, build_from_checkpoint, checkpoint_architecture, unwrap_state_dict

FORMATS = ("safetensors", "onnx")


@dataclass
class Exportable:
    """What one checkpoint exports: the whole network (ONNX) and its plain timm part (safetensors)."""

    technique: str
    network: nn.Module  # images (B, 3, H, W) -> ``output`` (B, ...)
    timm_model: nn.Module | None  # a plain timm model (None: the network cannot be one, e.g. unmerged adapters)
    architecture: str
    model_kwargs: dict
    image_size: int
    output: str  # "logits" or "embedding"
    head: str  # where the output head lives
    why_not_timm: str = ""


class ImageTower(nn.Module):
    """CLIP's image side: encoder, projection to the shared space, L2 normalisation."""

    def __init__(self, encoder: nn.Module, projection: nn.Module):
        super().__init__()
        self.encoder, self.projection = encoder, projection

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.encoder(images)), dim=-1)  # (B, E)


def _load_quietly(cls, path: str, **overrides) -> nn.Module:
    with warnings.catch_warnings(), allowlisted():
        warnings.simplefilter("ignore")
        return cls.load_from_checkpoint(path, map_location="cpu", weights_only=True, **overrides).eval()


def _own_backbone_file(folder: str, state: dict, arch_name: str, kwargs: dict, image_size: int) -> str:
    """A checkpoint of the run's own (unwrapped) backbone weights, so that rebuilding the run does not need its
    ``init_checkpoint`` to still exist (the run's state dict overwrites the weights anyway)."""
    path = Path(folder) / "backbone.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in unwrap_state_dict(state).items()},
                "hyper_parameters": {"backbone": arch_name, "backbone_kwargs": kwargs, "image_size": image_size}}, path)
    return str(path)


def _plain_kwargs(kwargs: dict) -> dict:
    return {k: v for k, v in (kwargs or {}).items() if k not in PRETRAINED_KEYS}


def exportable(checkpoint: str, folder: str) -> Exportable:
    """The network a checkpoint holds, by what the checkpoint records (``folder``: scratch space)."""
    ckpt = load_checkpoint(checkpoint)
    hparams = ckpt.get("hyper_parameters") or {}
    state = read_state_dict(checkpoint, ckpt)
    size = hparams.get("image_size")
    if not isinstance(size, int):
        raise ConfigError(f"checkpoint {checkpoint} records no image_size: export needs a checkpoint written by visionlab fit")
    if "method" in hparams:  # PEFT: merged into a plain timm model where the method merges
        from modules.peft import PEFTModule

        name, kwargs = hparams["backbone"], _plain_kwargs(hparams.get("backbone_kwargs"))
        own = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        model = _load_quietly(PEFTModule, checkpoint, init_checkpoint=_own_backbone_file(folder, own, name, kwargs, size),
                              backbone=name, backbone_kwargs=kwargs)
        try:
            plain, why = model.merged_backbone(), ""
        except ConfigError as err:
            plain, why = None, str(err)
        method = type(model.method).__name__
        return Exportable(f"peft ({method})", plain if plain is not None else model, plain, name, kwargs, size, "logits",
                          "timm classifier" if plain is not None else f"the {method} network (ONNX only)", why)
    if any(k.startswith("model.image_encoder.") for k in state):  # CLIP
        from modules.clip import CLIPModule

        model = _load_quietly(CLIPModule, checkpoint)
        tower = ImageTower(model.model.image_encoder, model.model.image_projection).eval()
        return Exportable("clip image tower", tower, model.model.image_encoder, hparams["backbone"],
                          _plain_kwargs(hparams.get("backbone_kwargs")), size, "embedding",
                          "CLIP's projection + L2 norm: in the ONNX graph only; the safetensors file is the image "
                          "encoder (pooled features)")
    if "pool" in hparams and "head.1.weight" in state:  # linear probe: frozen encoder + BatchNorm + Linear
        from modules.linear_probe import LinearProbeModule

        init = hparams.get("init_checkpoint")
        if hparams.get("backbone") is None and not (init and Path(init).is_file()):
            raise ConfigError(f"linear probe {checkpoint} records no backbone name and its init_checkpoint {init} is gone")
        arch = checkpoint_architecture(init, "init_checkpoint", hparams.get("backbone"), hparams.get("backbone_kwargs")) \
            if init and Path(init).is_file() else None
        name = arch.name if arch else hparams["backbone"]
        kwargs = _plain_kwargs(arch.kwargs if arch else hparams.get("backbone_kwargs"))
        own = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        probe = _load_quietly(LinearProbeModule, checkpoint, backbone=name, backbone_kwargs=kwargs,
                              init_checkpoint=_own_backbone_file(folder, own, name, kwargs, size))
        return Exportable("linear probe", probe, probe.backbone.module, name, kwargs, size, "logits",
                          f"BatchNorm1d(affine=False) + Linear on the {probe.pool}-pooled features: in the ONNX graph "
                          "only; the safetensors file is the frozen encoder")
    model, arch = build_from_checkpoint(checkpoint, head="keep", ckpt=ckpt)
    technique = "kd student" if "student" in hparams else "classifier"
    return Exportable(technique, model.eval(), model, arch.name, _plain_kwargs(arch.kwargs), size, "logits", "timm classifier")


def model_kwargs(exported: Exportable) -> dict:
    """``timm.create_model`` kwargs that rebuild the architecture (``img_size`` where the model takes one)."""
    kwargs = dict(exported.model_kwargs)
    model = exported.timm_model if exported.timm_model is not None else exported.network
    if "img_size" in inspect.signature(type(model).__init__).parameters:
        kwargs.setdefault("img_size", exported.image_size)
    return kwargs


def normalization(checkpoint: str, model: nn.Module) -> tuple[list[float], list[float], str]:
    """``(mean, std, source)``: the data's normalisation recorded in the checkpoint, else the model's default."""
    data = load_checkpoint(checkpoint).get("datamodule_hyper_parameters") or {}
    if data.get("mean") is not None and data.get("std") is not None:
        return [float(v) for v in data["mean"]], [float(v) for v in data["std"]], "the training data"
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return list(cfg.get("mean", (0.485, 0.456, 0.406))), list(cfg.get("std", (0.229, 0.224, 0.225))), "timm default"


def write_safetensors(exported: Exportable, output: Path) -> int:
    from safetensors.torch import save_file

    if exported.timm_model is None:
        raise ConfigError(f"{exported.technique} is not a plain timm model ({exported.why_not_timm}); "
                          "export it with --format onnx")
    state = {k: v.detach().contiguous().cpu() for k, v in exported.timm_model.state_dict().items()}
    return write_atomic(output, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"})).stat().st_size


def write_onnx(exported: Exportable, output: Path) -> tuple[int, int, float]:
    """Export with a dynamic batch axis and check it with onnxruntime; returns ``(bytes, opset, max |error|)``."""
    import onnx
    import onnxruntime

    size = exported.image_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch")

    def export(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(exported.network, (example,), str(tmp), dynamo=True, external_data=False, verbose=False,
                              input_names=["image"], output_names=[exported.output], dynamic_shapes=({0: batch},))

    write_atomic(output, export)
    opset = next(o.version for o in onnx.load(str(output)).opset_import if o.domain in ("", "ai.onnx"))
    check = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))  # another batch size
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: check.numpy()})[0])
    with torch.no_grad():
        expected = exported.network(check)
    error = float((got - expected).abs().max())
    # float32 kernels summing in another order: relative error ~ eps * sqrt(reduction length) per layer; 1e-4 of
    # the output's scale leaves room for a deep network and catches any wrong op (errors of order the output)
    if error > 1e-4 * (1 + float(expected.abs().max())):
        raise RuntimeError(f"onnxruntime's outputs of {output} differ from torch's by {error:.3g}")
    return output.stat().st_size, opset, error


def sidecar(exported: Exportable, checkpoint: str, fmt: str, output: Path) -> dict:
    """The JSON beside the exported file: what the weights are for and how timm loads them."""
    timm_model = exported.timm_model
    mean, std, source = normalization(checkpoint, timm_model if timm_model is not None else exported.network)
    num_classes = int(getattr(timm_model, "num_classes", 0) or 0)
    input_size = [3, exported.image_size, exported.image_size]
    with torch.no_grad():
        outputs = int(exported.network(torch.zeros(1, *input_size)).shape[-1])
    files = {fmt: output.name}
    previous = output.with_suffix(".json")
    if previous.is_file():  # the other format exported to the same stem from the same checkpoint: list both
        try:
            old = json.loads(previous.read_text())
        except ValueError:
            old = {}
        if old.get("source_checkpoint") == str(checkpoint):
            files = {**old.get("files", {}), **files}
    return {
        "technique": exported.technique, "source_checkpoint": str(checkpoint), "files": files,
        "architecture": exported.architecture, "num_classes": num_classes, "model_kwargs": model_kwargs(exported),
        "input_size": input_size, "mean": mean, "std": std, "normalization_from": source,
        "pretrained_cfg_overlay": {"num_classes": num_classes, "input_size": input_size, "mean": mean, "std": std},
        "head": exported.head,
        "onnx": {"input": "image (batch, 3, H, W) normalised with mean/std", "output": exported.output,
                 "output_size": outputs, "dynamic_axes": ["batch"]},
    }


def export(checkpoint: str, fmt: str, output: str) -> list[str]:
    """Write ``output`` and its JSON sidecar; returns the lines to print."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    output = Path(output)
    suffix = ".safetensors" if fmt == "safetensors" else ".onnx"
    if output.suffix != suffix:
        raise ConfigError(f"--output {output}: a {fmt} file must end in {suffix} (timm and onnxruntime go by the suffix)")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        exported = exportable(checkpoint, folder)
        if fmt == "safetensors":
            size = write_safetensors(exported, output)
            line = f"export: wrote {output} ({size} bytes; {exported.architecture}, plain timm state dict)"
        else:
            size, opset, error = write_onnx(exported, output)
            line = (f"export: wrote {output} ({size} bytes; ONNX opset {opset}, dynamic batch; onnxruntime matches "
                    f"torch within {error:.2g})")
        meta = sidecar(exported, checkpoint, fmt, output)
    json_path = output.with_suffix(".json")
    write_atomic(json_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    return [f"export: {exported.technique} from {checkpoint}", line, f"export: wrote {json_path} ({meta['head']})"]


def main(argv: list[str] | None = None) -> None:
    """``visionlab export --checkpoint CKPT --format safetensors|onnx --output PATH`` (``argv`` without the tool name)."""
    parser = argparse.ArgumentParser(prog="visionlab export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a .ckpt written by visionlab fit")
    parser.add_argument("--format", required=True, choices=FORMATS, help="safetensors (plain timm) or onnx (whole network)")
    parser.add_argument("--output", required=True, help="file to write (.safetensors or .onnx); the sidecar is <stem>.json")
    args = parser.parse_args(argv)
    # user errors (VisionlabError) propagate to app/cli.py's one error path: one line, exit code 2
    print("\n".join(export(args.checkpoint, args.format, args.output)))


if __name__ == "__main__":
    main()
