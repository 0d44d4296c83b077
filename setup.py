"""Packages, for setuptools; the metadata and dependencies are in setup.cfg."""
import setuptools

# configs/ stays at the top of the checkout (the layout t5x users know) and is installed as the
# package `hashmoe.configs` (as t5x ships t5x/configs/), so a non-editable `pip install .` finds
# every gin file, includes included, without an environment variable. setup.cfg cannot express a
# found package list plus a mapped one, hence this file.
setuptools.setup(
    packages=setuptools.find_packages(include=["hashmoe", "hashmoe.*"]) + ["hashmoe.configs"],
    package_dir={"hashmoe.configs": "configs"},
)
