"""Files: safetensors reading, atomic writes, base fingerprints and the .qpeft format."""
