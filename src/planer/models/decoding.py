"""How generation feeds a model its tokens, for models that carry their past in memory or not at all.

A decoder takes the sequence's newest tokens and returns the logits of the token after them. A model with memory
(``mem_len`` > 0) reads each token once, its memories carrying the past; a model with neither memory nor cache
reads its last ``cfg.context`` tokens again at every step. A family with a key/value cache brings its own decoder
(``LanguageModel.decoder``).
"""

from __future__ import annotations

import torch
from torch import nn


class MemoryDecoder:
    def __init__(self, model: nn.Module):
        self.model, self.mems = model, None
        self.device = model.embed.weight.device

    def step(self, new: list[int]) -> torch.Tensor:
        logits, self.mems = self.model(torch.tensor([new], device=self.device), self.mems)
        return logits[0, -1]


class WindowDecoder:
    def __init__(self, model: nn.Module):
        self.model, self.seq = model, []
        self.device = model.embed.weight.device

    def step(self, new: list[int]) -> torch.Tensor:
        self.seq += new
        logits, _ = self.model(torch.tensor([self.seq[-self.model.cfg.context :]], device=self.device))
        return logits[0, -1]
