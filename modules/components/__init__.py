"""Pure torch/timm building blocks (no Lightning, no technique imports).

The shared pieces sit here; each technique family's parts sit in their own folder (``mim/``, ``kd/``, ``peft/``,
``diffusion/``, ``clip/``, ``quant/``). A family imports only shared pieces, never another family.
"""

import importlib
import importlib.abc
import importlib.util
import sys

# Module paths of checkpoints written before ``modules/components`` was grouped by family -> today's paths.
LEGACY_MODULES = {
    "modules.components.specs": "modules.components.parts",
    "modules.components.masking": "modules.components.mim.masking",
    "modules.components.mim_parts": "modules.components.mim.encoders",
    "modules.components.distill": "modules.components.kd.distill",
    "modules.components.kd_targets": "modules.components.kd.targets",
    "modules.components.kd_terms": "modules.components.kd.terms",
    "modules.components.kd_mixing": "modules.components.kd.mixing",
    "modules.components.sparse_logits": "modules.components.kd.sparse_logits",
    "modules.components.peft": "modules.components.peft.layers",
    "modules.components.peft_methods": "modules.components.peft.methods",
    "modules.components.side_network": "modules.components.peft.side_network",
    "modules.components.low_bit": "modules.components.peft.low_bit",
    "modules.components.task_file": "modules.components.peft.task_file",
    "modules.components.diffusion": "modules.components.diffusion.gaussian",
    "modules.components.dit": "modules.components.diffusion.dit",
    "modules.components.dimr": "modules.components.diffusion.dimr",
    "modules.components.difffit": "modules.components.diffusion.difffit",
    "modules.components.frechet": "modules.components.diffusion.frechet",
    "modules.components.clip_loss": "modules.components.clip.loss",
    "modules.components.text": "modules.components.clip.text",
    "modules.components.token_masking": "modules.components.clip.token_masking",
    "modules.components.quant": "modules.components.quant.int8",
    "modules.components.hawq": "modules.components.quant.hawq",
    "modules.components.ternary": "modules.components.quant.ternary",
}


class _LegacyModuleAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Checkpoints and configs written before the family folders name parts by their old module paths
    (``modules.components.kd_targets.StoredLogits``): importing such a path gives today's module. The two old
    paths that are now packages (``peft``, ``diffusion``) forward their old names in the package instead."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in LEGACY_MODULES and fullname.rpartition(".")[2] not in ("peft", "diffusion"):
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(LEGACY_MODULES[spec.name])

    def exec_module(self, module):
        pass


sys.meta_path.append(_LegacyModuleAlias())
