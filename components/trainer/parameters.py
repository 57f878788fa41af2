"""How the Trainer's options are named as execution parameters (shared by its component and executor)."""

# The `model` option (the architecture) would clash with the `model` output channel.
PARAMETER_NAMES = {"model": "architecture"}
