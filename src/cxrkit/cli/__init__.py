"""The ``cxr`` command line."""
