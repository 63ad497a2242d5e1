"""Configuration: typed settings, ADDR parsing and the YAML loader. Layer 0: imports nothing of ours
outside this package."""
