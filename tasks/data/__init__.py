"""Training data: read files, normalise row formats, check quality and contracts, report, format for the chat template, and the seeded demo task."""
