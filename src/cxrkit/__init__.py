"""cxrkit: chest X-ray disease detection from raw datasets to a served model."""

__version__ = "0.1.0"
