"""Packages: xentlab's own (found, so a new subpackage ships without listing it) plus `xentlab.conf`, the
top-level conf/ mapped into the package by pyproject.toml's package-dir, and its config groups (conf/loss/,
...) with their YAML files. The groups are listed, not left as data folders of `xentlab.conf`: setuptools
sees every folder of an importable package as a (namespace) package and warns about each one it is not
told of. The rest is in pyproject.toml."""

import warnings

from setuptools import find_namespace_packages, find_packages, setup
from setuptools.warnings import InformationOnly

# An editable install always ends with setuptools' note on how it links the sources (not a problem, just
# information); silenced so the set-up scripts print nothing unless something is wrong.
warnings.filterwarnings("ignore", category=InformationOnly)

configs = ["xentlab.conf", *(f"xentlab.conf.{group}" for group in find_namespace_packages(where="conf"))]
setup(packages=[*find_packages(include=["xentlab", "xentlab.*"]), *configs],
      package_data={package: ["*.yaml"] for package in configs})
