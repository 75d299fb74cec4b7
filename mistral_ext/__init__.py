"""mistral_ext: an inference engine for the Mistral 7B architecture, built as a C++/CUDA torch extension."""

import torch  # noqa: F401  (loads libtorch before our extension links against it)

from . import ops
from .ops import build_info
from .version import __version__

__all__ = ["build_info", "ops", "__version__"]
