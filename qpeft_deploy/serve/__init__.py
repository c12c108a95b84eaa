"""HTTP serving (`qpeft serve`): a FastAPI app over a runtime backend; needs the [serve] extra."""
