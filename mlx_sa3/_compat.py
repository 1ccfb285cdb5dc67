"""Support for the compatibility aliases (``mlx_sa3.dit``, ``.same``, ``.t5gemma``): the pre-``models/`` paths."""


def reexport(namespace: dict, *modules) -> None:
    """Give an alias module every name of ``modules`` (private ones too: old callers reach into them)."""
    for module in modules:
        namespace.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
