"""dflsplit: peer-to-peer decentralized and split learning.

Layers (each a package with a base class and a registry of implementations chosen
by name in the config), from top to bottom: node, training, sharing, datasets,
models, graphs, mappings, communication. A layer imports only the layers below it.
"""

__version__ = "0.1.0"


def installed_version() -> str:
    """The version in the installed package's metadata (``pip install``), else `__version__`
    (a source tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dflsplit")
    except PackageNotFoundError:
        return __version__
