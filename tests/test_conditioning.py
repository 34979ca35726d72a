"""Training-time conditioning equals what StableDiffusionXLPipeline computes for the same prompt/size/crop."""

import torch

from koala.conditioning import encode_prompts, time_ids
from koala.lab.tiny import tiny_pipeline


def test_prompt_embeds_and_time_ids_equal_pipeline():
    pipe = tiny_pipeline(seed=1, words=["red", "circle", "left", "of"])
    prompts = ["a red circle left of a blue square", "photo"]
    pe, pooled = encode_prompts(prompts, [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2])
    ref_pe, _, ref_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert torch.equal(pe, ref_pe) and torch.equal(pooled, ref_pooled)
    ids = time_ids([[600, 400], [512, 512]], [[10, 3], [0, 0]], [[512, 512], [512, 512]])
    ref = pipe._get_add_time_ids((600, 400), (10, 3), (512, 512), dtype=torch.float32,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(ids[0:1], ref)
    assert ids.shape == (2, 6)
