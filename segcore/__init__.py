"""kitseg's shared core: the U-Net, preprocessing, volume I/O, checkpoint format, inference engine
and statistics. It imports neither ``app`` nor ``training``."""

__version__ = "0.1.0"
