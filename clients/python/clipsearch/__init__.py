"""clipsearch: semantic image search with CLIP over gRPC.

This package holds the generated API stubs (``clipsearch.<service>.v1``), the
client SDK (``clipsearch.client``), the CLI (``clipsearch.cli``) and the
plumbing shared by the three services (``clipsearch.server``).
"""

__version__ = "0.1.0"
