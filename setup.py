"""Ships the reference pipelines and device profiles inside the wheel.

The top-level ``pipelines/`` and ``devices/`` folders are the ones users read and edit in
a checkout; a wheel cannot reach them once installed, so ``build_py`` copies them into
``edgeqat/shipped/`` of the build (never into the source tree). ``edgeqat.config`` uses
the shipped copies when they exist and the checkout's folders otherwise. Everything else
about the package is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("pipelines", "devices")


class BuildPyWithReferenceFiles(build_py):
    """build_py, plus pipelines/*.toml and devices/*.toml under edgeqat/shipped/."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # editable: config reads the checkout
            return
        for folder in SHIPPED:
            target = Path(self.build_lib) / "edgeqat" / "shipped" / folder
            target.mkdir(parents=True, exist_ok=True)
            for src in sorted((ROOT / folder).glob("*.toml")):
                shutil.copyfile(src, target / src.name)


setup(cmdclass={"build_py": BuildPyWithReferenceFiles})
