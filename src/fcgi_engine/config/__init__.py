"""Configuration: the settings table (`settings`), ADDR parsing (`address`), the YAML loader
(`loader`) and what a generation is told when it is exec'd (`boot`). Layer 0: imports nothing of
ours outside this package."""
