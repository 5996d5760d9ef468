"""bmsgw: the edge gateway daemon (config, decoding, process image, loops, control socket, CLI)."""

__version__ = "0.1.0"
