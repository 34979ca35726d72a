"""Small shared helpers, one module per concern (import from the module, e.g. ``koala.utils.files``):

- ``files``: JSON / JSON-lines reading, output-folder checks, atomic files, folders and JSON writes;
- ``devices``: dtype and device names, checked against this machine; moving nested tensors;
- ``weights``: safetensors headers and integrity, meta-device buffers, parameter counts;
- ``signals``: ``StopRequest`` (save and stop on SIGTERM / SIGUSR1 / Ctrl-C) and its exit status;
- ``compile``: ``torch.compile`` of a model in place, whole or by repeated blocks;
- ``attention``: the SDPA backend switch;
- ``extras``: optional dependencies with the extra that provides them;
- ``console``: tables and progress bars that read well on a terminal and in a log (``print_table``,
  ``markdown_table``, ``progress_bar``).
"""
