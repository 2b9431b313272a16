"""Packages: xentlab's own (found, so a new subpackage ships without listing it) plus `xentlab.conf`,
the top-level conf/ mapped into the package by pyproject.toml's package-dir. The rest is in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["xentlab", "xentlab.*"]), "xentlab.conf"])
