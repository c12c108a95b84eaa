"""The ``qpeft`` command line (a thin layer over the library)."""
