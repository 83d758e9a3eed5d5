"""The lowest layer: user errors, atomic files, checks on the input models, how head outputs combine."""
