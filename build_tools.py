"""Finds the build tools (cmake, ninja) the way setup.py and the tests that build C++ do: the ones installed in the
running interpreter's environment first (requirements/build.txt puts them there), else the first on PATH, so a
venv's python run without activating the venv does not pick the system's older CMake."""

import shutil
import sys
import sysconfig
from pathlib import Path


def build_tool(name: str) -> str | None:
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        found = shutil.which(name, path=folder)
        if found:
            return found
    return shutil.which(name)
