"""Small shared helpers, one module per concern (import from the module, e.g. ``koala.utils.files``):

- ``files``: JSON / JSON-lines reading, output-folder checks, atomic files, folders and JSON writes, appends;
- ``writes``: a failed write read by its errno (disk full, quota exceeded) and the one message every writer gives;
- ``devices``: dtype and device names, checked against this machine; moving nested tensors;
- ``weights``: safetensors headers and integrity, the one ``.pt`` loader (tensors and plain values only) and saver,
  tensor byte counts, meta-device buffers, parameter counts;
- ``signals``: ``StopRequest`` (save and stop on SIGTERM / SIGUSR1 / Ctrl-C) and its exit status;
- ``compile``: ``torch.compile`` of a model in place, whole or by repeated blocks;
- ``attention``: the SDPA backend switch;
- ``extras``: optional dependencies with the extra that provides them;
- ``console``: tables and progress bars that read well on a terminal and in a log (``print_table``,
  ``markdown_table``, ``progress_bar``).
"""
