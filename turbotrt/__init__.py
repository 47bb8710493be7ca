"""turbotrt: TurboDiffusion video models as deployable inference engines."""
__version__ = "0.1.0"
