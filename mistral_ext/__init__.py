"""mistral_ext: an inference engine for the Mistral 7B architecture, built as a C++/CUDA torch extension."""

import torch  # noqa: F401  (loads libtorch before our extension links against it)

from . import ops
from .args import ModelArgs
from .engine import Model, load
from .generate import Completion, generate, generate_tokens
from .model import RollingBufferCache
from .moderation import moderate
from .ops import build_info, cpu_path, cpu_paths, set_cpu_path
from .version import __version__

__all__ = ["Completion", "Model", "ModelArgs", "RollingBufferCache", "build_info", "cpu_path", "cpu_paths", "generate",
           "generate_tokens", "load", "moderate", "ops", "set_cpu_path", "__version__"]
