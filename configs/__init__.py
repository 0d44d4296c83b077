"""hashmoe's gin configs, installed as the package `hashmoe.configs` (see setup.cfg)."""
