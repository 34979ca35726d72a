"""Training-time conditioning equals what each family's diffusers pipeline computes for the same prompt/size/crop."""

import torch

from koala.families import get_family
from koala.families.sdxl import time_ids
from koala.testing.tiny import tiny_pipeline


def test_sdxl_prompt_embeds_and_time_ids_equal_pipeline():
    pipe = tiny_pipeline(seed=1, words=["red", "circle", "left", "of"])
    prompts = ["a red circle left of a blue square", "photo"]
    fam = get_family("sdxl")
    cond = fam.encode_prompts(prompts, [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2])
    ref_pe, _, ref_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert torch.equal(cond["prompt_embeds"], ref_pe) and torch.equal(cond["pooled_prompt_embeds"], ref_pooled)
    ids = time_ids([[600, 400], [512, 512]], [[10, 3], [0, 0]], [[512, 512], [512, 512]])
    ref = pipe._get_add_time_ids(
        (600, 400),
        (10, 3),
        (512, 512),
        dtype=torch.float32,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )
    assert torch.equal(ids[0:1], ref)
    assert ids.shape == (2, 6)
    micro = fam.micro_conditions(
        {
            "original_size": torch.tensor([[600, 400]]),
            "crop_top_left": torch.tensor([[10, 3]]),
            "target_size": torch.tensor([[512, 512]]),
        }
    )
    assert torch.equal(micro["add_time_ids"], ref)
    # the unconditional input is zeros (force_zeros_for_empty_prompt)
    _, neg_pe, _, neg_pooled = pipe.encode_prompt(prompts[:1], do_classifier_free_guidance=True, negative_prompt=None)
    from koala.families import Parts

    unc = fam.uncond(
        Parts(
            fam, [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], pipe.vae, pipe.scheduler
        )
    )
    assert torch.equal(unc["prompt_embeds"], neg_pe) and torch.equal(unc["pooled_prompt_embeds"], neg_pooled)


def test_sd_prompt_embeds_and_uncond_equal_pipeline():
    from koala.families import Parts

    pipe = tiny_pipeline(seed=2, words=["red", "circle"], family="sd")
    fam = get_family("sd")
    prompts = ["a red circle", "photo of a square"]
    cond = fam.encode_prompts(prompts, [pipe.tokenizer], [pipe.text_encoder])
    ref, neg = pipe.encode_prompt(prompts, "cpu", 1, do_classifier_free_guidance=True)
    assert set(cond) == {"prompt_embeds"} and torch.equal(cond["prompt_embeds"], ref)
    parts = Parts(fam, [pipe.tokenizer], [pipe.text_encoder], pipe.vae, pipe.scheduler)
    assert torch.equal(fam.uncond(parts)["prompt_embeds"][0], neg[0])
    assert fam.micro_conditions({}) == {}
