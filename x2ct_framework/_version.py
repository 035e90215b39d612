"""The version of x2ct-framework (``x2ct_framework.__version__``); CHANGELOG.md lists what each one changed."""

__version__ = "0.2.0"
