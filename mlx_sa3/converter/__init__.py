"""The checkpoint converter: core (:mod:`.core`), safetensors streaming I/O (:mod:`.safetensors_io`) and the
diffusers import (:mod:`.diffusers`). The entry points are ``python -m mlx_sa3.convert`` and the root convert.py."""
