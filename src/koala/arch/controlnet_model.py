"""``KoalaControlNetModel``: diffusers' ``ControlNetModel`` that also takes ``mid_block_type=None``.

A student U-Net without a mid block (KOALA-700M, BK-SDM-Small/Tiny) needs a ControlNet without one; diffusers'
class refuses ``mid_block_type=None`` in ``__init__`` although its ``forward`` already skips a missing mid block
(the mid residual is then ``controlnet_mid_block`` applied to the last encoder stage's output, which the student
U-Net adds where its mid block would be). This class changes only that. Every other config, every weight name
and the forward are diffusers' own.

This file imports nothing but diffusers so that koala can copy it, unchanged, into every student ControlNet
folder that needs it (``koala_controlnet.py``, named in ``config.json``'s ``auto_map``). Other tools then load such
a folder without koala:

    from diffusers import AutoModel
    controlnet = AutoModel.from_pretrained(folder, trust_remote_code=True)
"""

import functools

from diffusers import ControlNetModel


class KoalaControlNetModel(ControlNetModel):
    """A ``ControlNetModel`` whose ``mid_block_type`` may be ``None`` (no mid block)."""

    @functools.wraps(ControlNetModel.__init__)  # the same signature: diffusers reads the config keys from it
    def __init__(self, *args, **kwargs):
        no_mid = "mid_block_type" in kwargs and kwargs["mid_block_type"] is None
        if no_mid:
            kwargs["mid_block_type"] = "UNetMidBlock2D"  # built, then dropped: diffusers' __init__ needs a type
        super().__init__(*args, **kwargs)
        if no_mid:
            self.mid_block = None
            self.register_to_config(mid_block_type=None)
