"""Converters between Hugging Face / PEFT / original-MeteoRA files and meteora-jax models and checkpoints.

Run `python -m convert --help` for the command line.
"""


class ConversionError(ValueError):
    """Input that cannot be converted; the message names the file or key and what was expected."""
