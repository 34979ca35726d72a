"""Checkpoint formats: the original single-file layout (LDM / SGM) both ways, and LoRA files.

:mod:`~koala.formats.ldm` holds the key maps, :mod:`~koala.formats.single_file` export and import,
:mod:`~koala.formats.lora` the transfer of an SDXL LoRA onto a KOALA student through its layer map.
"""
