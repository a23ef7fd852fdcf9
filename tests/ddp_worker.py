"""A few steps of training and of search, run by test_distributed.py alone or under torchrun.

Afterwards every rank writes the weights (and the supernet's alpha) it holds in memory, so the test can check that
the ranks agree with each other and with a single process. Usage: ddp_worker.py CONFIG LUT OUT [--set K=V ...]
"""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

import planer.search.gumbel
import planer.training.train
from planer.config import load_config
from planer.models.arch import Arch
from planer.models.backbone import build_model
from planer.search.supernet import SuperNet
from planer.training.loop import RunOptions

built: dict[str, list] = {"train": [], "search": []}


def recorded_model(*args, **kwargs):
    model = build_model(*args, **kwargs)
    built["train"].append(model)
    return model


class RecordedSuperNet(SuperNet):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        built["search"].append(self)


planer.training.train.build_model = recorded_model
planer.search.gumbel.SuperNet = RecordedSuperNet

config, lut, out = sys.argv[1:4]
overrides = [a for a in sys.argv[4:] if a != "--set"]
cfg = load_config(config, overrides)
out = Path(out)
planer.training.train.train(
    cfg, out / "train", Arch.parse("attn:4 ffl attn:2 moe:top2"), options=RunOptions(quiet=True)
)
planer.search.gumbel.search(cfg, out / "search", 0.6, lut_path=lut, options=RunOptions(quiet=True))
rank = os.environ.get("RANK", "0")
for stage, models in built.items():
    save_file(
        {k: v.detach().contiguous() for k, v in models[-1].state_dict().items()},
        str(out / f"{stage}-rank{rank}.safetensors"),
    )
