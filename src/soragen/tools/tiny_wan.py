"""A tiny Wan pipeline with random weights, for trying the Wan path offline (and testing and
benchmarking it): nothing in soragen imports this module.

    python -m soragen.tools.tiny_wan wan-tiny      # a diffusers WanPipeline folder
    soragen generate "a red ball" --model wan-tiny --frames 9 --height 64 --width 64 --steps 4
    python -m soragen.tools.tiny_wan wan-i2v --i2v  # a WanImageToVideoPipeline (Wan 2.1 I2V's, with CLIP)
    soragen generate "a red ball" --model wan-i2v --image first.png --frames 9 --height 64 --width 64 --steps 4
"""

from __future__ import annotations

import sys

import torch

TINY_WORDS = ["[PAD]", "[UNK]", "</s>", "a", "an", "the", "red", "blue", "green", "yellow", "ball", "box", "sky",
              "grass", "moving", "falling", "right", "left", "in", "on", "at", "night", "sora", "is"]


def _randomise(module: torch.nn.Module, generator: torch.Generator, scale: float) -> torch.nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return module.eval()


def tiny_clip(generator: torch.Generator):
    """A CLIP vision tower and its image processor at a toy size: 32x32 images in 8x8 patches, 17 tokens."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=3,
                                             num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return _randomise(model, generator, 0.2), processor


def tiny_pipeline(seed: int = 0, head_dim: int = 20, ti2v: bool = False, experts: int = 1, i2v: str | None = None):
    """A diffusers WanPipeline of Wan 2.1's architecture at a toy size, every weight random: a
    word-level tokenizer, a 2-layer umT5, a Wan VAE of x4 in time and space, a 2-block transformer,
    UniPC with flow sigmas. It makes noise, not videos; it runs every part of the Wan path.
    `ti2v`: Wan 2.2 TI2V-5B's architecture instead: a residual VAE on 2x2 patches of pixels (x8 in
    space), 8 latent channels, and a timestep per token (`expand_timesteps`). `experts=2`: Wan 2.2
    A14B's pair, a second transformer for the steps below boundary_ratio 0.875 (0.9 with `i2v`).
    `i2v`: a WanImageToVideoPipeline whose transformer takes the image's latent and a mask as input
    channels: "channels" (Wan 2.2 I2V-A14B's, with experts=2), "clip" (Wan 2.1 I2V's: and a tiny CLIP
    vision tower's tokens), "flf2v" (FLF2V's: a first and a last image, their tokens positioned)."""
    from diffusers import (AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline,
                           WanTransformer3DModel)
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TINY_WORDS)}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]", eos_token="</s>")
    g = torch.Generator().manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(TINY_WORDS), d_model=16, d_kv=8, d_ff=32, num_layers=2,
                                               num_heads=2, relative_attention_num_buckets=8,
                                               relative_attention_max_distance=16, pad_token_id=0, eos_token_id=2,
                                               decoder_start_token_id=0))
    z_dim = 8 if ti2v else 4
    stats = torch.rand(2, z_dim, generator=g) if ti2v else None  # drawn only here: Wan 2.1's tiny weights stay as they were
    vae = AutoencoderKLWan(base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 1], num_res_blocks=1, temperal_downsample=[True, True],
                           latents_mean=(stats[0] - 0.5).tolist() if ti2v else [0.3, -0.2, 0.1, 0.5],
                           latents_std=(stats[1] + 0.5).tolist() if ti2v else [1.5, 0.8, 2.0, 1.1],
                           scale_factor_spatial=8 if ti2v else 4, scale_factor_temporal=4,
                           **(dict(is_residual=True, in_channels=12, out_channels=12, patch_size=2) if ti2v else {}))
    clip = i2v in ("clip", "flf2v")
    image = dict(image_dim=24, added_kv_proj_dim=2 * head_dim, pos_embed_seq_len=34 if i2v == "flf2v" else None) \
        if clip else {}
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim,
                                        in_channels=2 * z_dim + 4 if i2v else z_dim, out_channels=z_dim, text_dim=16,
                                        freq_dim=256, ffn_dim=48, num_layers=2, cross_attn_norm=True,
                                        qk_norm="rms_norm_across_heads", eps=1e-6, **image)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    parts = dict(tokenizer=tokenizer, text_encoder=_randomise(text_encoder, g, 0.2), vae=_randomise(vae, g, 0.1),
                 scheduler=scheduler, transformer=_randomise(transformer, g, 0.2), expand_timesteps=ti2v)
    if experts == 2:  # drawn after the rest: the one-expert pipeline's weights stay as they were
        second = WanTransformer3DModel.from_config(transformer.config)
        parts.update(transformer_2=_randomise(second, g, 0.2), boundary_ratio=0.9 if i2v else 0.875)
    if not i2v:
        return WanPipeline(**parts)
    if clip:
        parts["image_encoder"], parts["image_processor"] = tiny_clip(g)
        if i2v == "flf2v":
            with torch.no_grad():  # diffusers makes them zeros; random, so that a wrong order would show
                transformer.condition_embedder.image_embedder.pos_embed.copy_(torch.randn(1, 34, 24, generator=g))
    return WanImageToVideoPipeline(**parts)


KINDS = {"": {}, "--ti2v": dict(ti2v=True), "--a14b": dict(experts=2), "--i2v": dict(i2v="clip"),
         "--i2v-a14b": dict(i2v="channels", experts=2), "--flf2v": dict(i2v="flf2v")}

if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or " ".join(sys.argv[2:]) not in KINDS:
        sys.exit(f"usage: python -m soragen.tools.tiny_wan FOLDER [{' | '.join(k for k in KINDS if k)}]")
    pipe = tiny_pipeline(**KINDS[" ".join(sys.argv[2:])])
    pipe.save_pretrained(sys.argv[1])
    print(f"wrote a tiny random {type(pipe).__name__} to {sys.argv[1]}")
