"""x2ct-framework: reconstruct 3D CT volumes from two or more 2D X-ray views.

The core is small: hook specifications (`hookspecs`), the plugin manager and registries
(`plugins`, `registry`), recipe loading (`recipe`), the progressive trainer (`trainer`), physics
(`physics`), metrics and checkpoints. Models, losses and datasets are plugins.
"""

__version__ = "0.1.0"


def load_pretrained(path, device="cpu"):
    """The model of an exported folder (``x2ct export``), ready for inference; see :mod:`x2ct_framework.export`."""
    from x2ct_framework.export import load_pretrained as _load

    return _load(path, device)


__all__ = ["__version__", "load_pretrained"]
