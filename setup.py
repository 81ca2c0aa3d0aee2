"""Only here to run a build step: the gRPC stubs are generated from proto/ when the package is built
(editable installs included). Everything else is in pyproject.toml."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        spec = importlib.util.spec_from_file_location("build_stubs", Path(__file__).parent / "proto" / "build_stubs.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.generate()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
