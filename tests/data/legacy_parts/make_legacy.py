"""Wrote the checkpoints beside it with visionlab at 2d6cb47 (before the part contract) for tests/test_parts.py:
`git worktree add /tmp/legacy 2d6cb47 && cd /tmp/legacy && PYTHONPATH=. python3 <this file> <out dir>`."""
import sys, torch
from functools import partial
out = sys.argv[1]
torch.manual_seed(0)
from modules.kd import DistillationModule
from modules.components.kd_targets import StoredLogits
from modules.components.kd_terms import HardLabels
from modules.components.kd_mixing import SoftTargetMix
from modules.peft import PEFTModule
from modules.components.peft_methods import AdapterTuning, SequentialPlacement
from modules.components.low_bit import NormalQuantile
from modules.clip import CLIPModule
from modules.components.token_masking import RandomMasking
from modules.mr_mae import MRMAEModule, MimicTeacher

def save(name, m):
    torch.save({"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams), "pytorch-lightning_version": "2.6.6",
                "hparams_name": "kwargs"}, f"{out}/{name}.ckpt")

save("kd", DistillationModule("test_resnet", num_classes=3, image_size=32, targets=StoredLogits(),
                              terms=[HardLabels(weight=0.5, criterion=torch.nn.BCEWithLogitsLoss())],
                              mixing=SoftTargetMix(mixup_alpha=0.4, cutmix_alpha=0.0), temperature=2.0))
save("peft", PEFTModule("test_resnet", num_classes=3, image_size=32,
                        method=AdapterTuning(dim=4, quantizer=NormalQuantile(bits=2), placement=SequentialPlacement())))
save("clip", CLIPModule("test_vit", 3, 32, {"patch_size": 8, "depth": 1}, embed_dim=8, text_width=8, text_depth=1,
                        text_heads=2, vocab_size=64, masking=RandomMasking(0.5)))
save("mr_mae", MRMAEModule("test_vit", num_classes=3, image_size=32, backbone_kwargs={"patch_size": 8, "depth": 1},
                           teachers=[MimicTeacher("test_vit", None, {"patch_size": 8, "depth": 1}, weight=0.5)],
                           decoder_dim=8, decoder_depth=1, decoder_heads=2))
