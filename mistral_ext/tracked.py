"""nn.Module with its attribute assignments counted, so that what is gathered from a model's modules once (the
decode plan, mistral_ext.model.DecodePlan) knows when it has gone stale."""

from __future__ import annotations

from torch import nn


class TrackedModule(nn.Module):
    edits = 0  # attributes set or deleted on every TrackedModule so far: a weight replaced, an op set or a flag changed

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        TrackedModule.edits += 1

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)
        TrackedModule.edits += 1
