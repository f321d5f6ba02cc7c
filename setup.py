"""Puts the shipped playbooks/ and modules/ inside the wheel as fleetprobe/_shipped/.

Everything else is in pyproject.toml. A checkout (and an editable install) uses
the top-level folders in place; fleetprobe.shipped finds either.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
#: Build products a module folder may hold after a build in place; never shipped.
NOT_SHIPPED = shutil.ignore_patterns(".*", "*.o", "*.ko", "*.mod", "*.mod.c", "*.cmd", "Module.symvers",
                                     "modules.order", "__pycache__")


class BuildPyWithShipped(build_py):
    """build_py, plus a copy of playbooks/ and modules/ into the built package."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads the checkout's folders
        for part in ("playbooks", "modules"):
            if (ROOT / part).is_dir():
                shutil.copytree(ROOT / part, Path(self.build_lib) / "fleetprobe" / "_shipped" / part,
                                ignore=NOT_SHIPPED, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithShipped})
