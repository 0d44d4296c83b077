"""Packaging that setup.cfg cannot say: configs/ lives at the top level of the project (the layout
the docs and commands use) and installs as package data of `hashmoe.configs`, as t5x ships
t5x/configs/, so that a non-editable `pip install .` finds every gin file without HASHMOE_CONFIGS
(`hashmoe.cli.configs_dir`)."""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["hashmoe", "hashmoe.*"]) + ["hashmoe.configs"],
    package_dir={"hashmoe.configs": "configs"},
    package_data={"hashmoe": ["data/*.json"], "hashmoe.configs": ["**/*.gin"]},
)
