"""Wan 2.1 as a family of our DiT: its config as DiTConfig switches, and its weights' key map.

diffusers' WanTransformer3DModel is our VideoDiT with Wan's switches (soragen.config.DiTConfig):
3D RoPE, a shared timestep projection plus a table per block, q/k RMS-normed across heads, an MLP
projecting umT5's 4096-d text, tanh GELU, no pooled text and no text mask. Its weights map onto
ours one to one, except that q, k and v are fused (and k, v of cross-attention), and the patch
embedding is a Conv3d whose kernel is the patch, which is our Linear on the flattened patch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from soragen.core.config import DiTConfig, ImageEncoderSpec, SamplingDefaults, TextEncoderSpec, VideoDefaults
from soragen.core.errors import SoragenError
from soragen.core.jsonfile import INCOMPLETE, read_json
from soragen.diffusion.sampling import check_sampler, read_schedule
from soragen.families.base import Family

# diffusers' WanTransformer3DModel configs of the released text-to-video models (their config.json)
WAN_2_1_T2V_1_3B = dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16,
                        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
                        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None,
                        added_kv_proj_dim=None, rope_max_seq_len=1024)
WAN_2_1_T2V_14B = dict(WAN_2_1_T2V_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)

# The switches that make our DiT Wan's (the sizes come from each model's config)
WAN_SWITCHES = dict(cross_attention=True, qk_norm=True, qk_norm_across_heads=True, positions="rope",
                    modulation="shared", pooled_text=False, text_projection="mlp", text_mask=False, gelu="tanh",
                    timestep_features="cos_sin_float32", fp32_modulation=True)


def dit_config(transformer: dict, source: str = "transformer/config.json") -> DiTConfig:
    """Our DiTConfig for a diffusers WanTransformer3DModel config; SoragenError for what we do not run.
    Image-to-video ones take more input channels than they predict (out_channels), and Wan 2.1's an
    image encoder's tokens (image_dim, with learned positions of pos_embed_seq_len tokens for FLF2V)."""
    def need(key, ok, what):
        if not ok(transformer.get(key)):
            raise SoragenError(f"{source}: {key} = {transformer.get(key)!r}; soragen runs {what}")
    need("cross_attn_norm", lambda v: v is True, "Wan with cross_attn_norm true")
    need("qk_norm", lambda v: v == "rms_norm_across_heads", "Wan with qk_norm rms_norm_across_heads")
    need("freq_dim", lambda v: v == 256, "a 256-d timestep embedding")
    need("eps", lambda v: v is not None and abs(v - 1e-6) < 1e-12, "eps 1e-6")
    try:
        heads, head_dim = int(transformer["num_attention_heads"]), int(transformer["attention_head_dim"])
        image_dim = transformer.get("image_dim") or 0
        need("added_kv_proj_dim", lambda v: v == (heads * head_dim if image_dim else None),
             "Wan whose image keys and values (added_kv_proj_dim) come from image_dim's projection to the width")
        out = transformer.get("out_channels") or transformer["in_channels"]
        return DiTConfig(in_channels=transformer["in_channels"], patch_size=transformer["patch_size"],
                         hidden_size=heads * head_dim, depth=transformer["num_layers"], num_heads=heads,
                         ffn_dim=transformer["ffn_dim"], text_dim=transformer["text_dim"], **WAN_SWITCHES,
                         out_channels=0 if out == transformer["in_channels"] else out, image_dim=image_dim,
                         image_tokens=transformer.get("pos_embed_seq_len") or 0)
    except (KeyError, TypeError, ValueError) as err:
        raise SoragenError(f"{source}: not a WanTransformer3DModel config we can read: {err}") from err


# ---- the key map -------------------------------------------------------------------------------------

@dataclass
class Rule:
    """Our tensor `key` is made of diffusers' `sources`: copied, concatenated along dim 0 (fused
    projections), or a Conv3d kernel flattened into a Linear's weight in patchify's (pt ph pw c) order."""

    key: str
    sources: list[str]
    how: str = "copy"  # copy | cat | conv


def key_map(depth: int, image: bool = False, image_positions: bool = False) -> list[Rule]:
    """Our keys from diffusers'; `image`: an image-to-video DiT's image embedder and image keys/values,
    `image_positions`: FLF2V's learned positions of the image tokens."""
    rules = [Rule("patch_embed.weight", ["patch_embedding.weight"], "conv"),
             Rule("patch_embed.bias", ["patch_embedding.bias"])]
    rules += image_rules(depth) if image else []
    if image_positions:
        rules.append(Rule("image_tokens.positions", ["condition_embedder.image_embedder.pos_embed"]))
    pairs = {"time_embed.mlp.0": "condition_embedder.time_embedder.linear_1",
             "time_embed.mlp.2": "condition_embedder.time_embedder.linear_2",
             "time_proj.1": "condition_embedder.time_proj",
             "text_tokens.0": "condition_embedder.text_embedder.linear_1",
             "text_tokens.2": "condition_embedder.text_embedder.linear_2",
             "final.linear": "proj_out"}
    for i in range(depth):
        b, w = f"blocks.{i}.", f"blocks.{i}."
        pairs.update({b + "attn.proj": w + "attn1.to_out.0", b + "cross.q": w + "attn2.to_q",
                      b + "cross.proj": w + "attn2.to_out.0", b + "norm_cross": w + "norm2",
                      b + "mlp.0": w + "ffn.net.0.proj", b + "mlp.2": w + "ffn.net.2"})
        for ours, theirs in (("attn", "attn1"), ("cross", "attn2")):
            rules += [Rule(f"{b}{ours}.q_norm.weight", [f"{w}{theirs}.norm_q.weight"]),
                      Rule(f"{b}{ours}.k_norm.weight", [f"{w}{theirs}.norm_k.weight"])]
        for part in ("weight", "bias"):
            rules.append(Rule(f"{b}attn.qkv.{part}", [f"{w}attn1.to_{x}.{part}" for x in "qkv"], "cat"))
            rules.append(Rule(f"{b}cross.kv.{part}", [f"{w}attn2.to_{x}.{part}" for x in "kv"], "cat"))
        rules.append(Rule(f"{b}adaLN_modulation.table", [f"{w}scale_shift_table"]))
    rules.append(Rule("final.adaLN_modulation.table", ["scale_shift_table"]))
    rules += [Rule(f"{ours}.{part}", [f"{theirs}.{part}"]) for ours, theirs in pairs.items() for part in ("weight", "bias")]
    return rules


def image_rules(depth: int) -> list[Rule]:
    """The image embedder (norm, MLP, norm) and each block's image keys/values and key norm."""
    parts = {"norm1": "norm1", "mlp.0": "ff.net.0.proj", "mlp.2": "ff.net.2", "norm2": "norm2"}
    rules = [Rule(f"image_tokens.{ours}.{p}", [f"condition_embedder.image_embedder.{theirs}.{p}"])
             for ours, theirs in parts.items() for p in ("weight", "bias")]
    for i in range(depth):
        rules += [Rule(f"blocks.{i}.cross.image_kv.{p}", [f"blocks.{i}.attn2.add_{x}_proj.{p}" for x in "kv"], "cat")
                  for p in ("weight", "bias")]
        rules.append(Rule(f"blocks.{i}.cross.image_k_norm.weight", [f"blocks.{i}.attn2.norm_added_k.weight"]))
    return rules


def config_key_map(config: DiTConfig) -> list[Rule]:
    return key_map(config.depth, bool(config.image_dim), bool(config.image_tokens))


def mapped_shape(rule: Rule, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The shape our tensor gets from sources of these shapes."""
    if rule.how == "cat":
        return (sum(s[0] for s in shapes), *shapes[0][1:])
    if rule.how == "conv":
        out, *rest = shapes[0]
        return (out, math.prod(rest))
    return shapes[0]


def rows(rule: Rule, shapes: list[tuple[int, ...]]) -> list[slice] | None:
    """The rows of our tensor each source fills (a fused projection: one after the other), or None
    where the sources must be combined after reading (the patch kernel's reordering)."""
    if rule.how == "conv":
        return None
    starts = [0]
    for shape in shapes:
        starts.append(starts[-1] + shape[0])
    return [slice(a, b) for a, b in zip(starts, starts[1:])] if rule.how == "cat" else [slice(None)]


def combine(rule: Rule, tensors: list[torch.Tensor]) -> torch.Tensor:
    if rule.how == "cat":
        return torch.cat(tensors, dim=0)
    if rule.how == "conv":  # (D, C, pt, ph, pw) -> (D, pt*ph*pw*C), as patchify orders a patch
        return tensors[0].permute(0, 2, 3, 4, 1).reshape(tensors[0].shape[0], -1)
    return tensors[0]


def read_transformer_config(folder: Path) -> dict:
    path = folder / "config.json"
    config = read_json(path, missing=f"{folder} has no config.json (a diffusers transformer folder)")
    if not isinstance(config, dict) or config.get("_class_name", "WanTransformer3DModel") != "WanTransformer3DModel":
        raise SoragenError(f"{path} is not a WanTransformer3DModel config")
    return config


def load_transformer(folder: Path, dtype: torch.dtype = torch.float32):
    """Our VideoDiT with the weights of a diffusers WanTransformer3DModel folder (config.json +
    safetensors, sharded or not), checked by the files' headers before any tensor is read, then
    read shard by shard into `dtype`: memory never holds much more than the model."""
    from soragen.models.dit import VideoDiT
    from soragen.core.weights import Mapping, load_into, weight_files
    config = dit_config(read_transformer_config(folder), str(folder / "config.json"))
    with torch.device("meta"):  # no memory and no random init: every weight comes from the files
        dit = VideoDiT(config).cast("meta", dtype)
    load_into(dit, weight_files(folder, "Wan transformer"), f"Wan transformer ({folder})",
              Mapping(config_key_map(config), mapped_shape, combine, rows))
    return dit.eval().requires_grad_(False)


# What WanPipeline makes unless told otherwise (its __call__'s defaults), and Wan's frame rate.
WAN_VIDEO = dict(frames=81, height=480, width=832, fps=16.0)
WAN_TI2V_VIDEO = dict(frames=121, height=704, width=1280, fps=24.0)  # Wan 2.2 TI2V-5B's (its model card's)
WAN_SAMPLING = dict(sampler="unipc", steps=50, guidance=5.0, negative_prompt="")


def text_encoder_spec(folder: Path, source: str) -> TextEncoderSpec:
    """umT5 from the pipeline folder (named by `source`, the folder or hub id the user gave), its
    prompts cleaned as WanPipeline cleans them, zero-padded to 512 tokens, in the dtype it is stored in."""
    from soragen.models.text import check_encoder_folder
    encoder_config = read_json(folder / "text_encoder" / "config.json", INCOMPLETE)
    if not isinstance(encoder_config, dict):
        raise SoragenError(f"{folder / 'text_encoder' / 'config.json'} is not a JSON object")
    check_encoder_folder(folder, "text_encoder", "tokenizer")  # now, before any weight is read
    stored = str(encoder_config.get("dtype") or encoder_config.get("torch_dtype") or "float32").replace("torch.", "")
    return TextEncoderSpec(source=source, subfolder="text_encoder", tokenizer_subfolder="tokenizer",
                           max_length=512, padding="zeros", clean="wan",
                           dtype="bfloat16" if stored == "bfloat16" else "float32")


PIPELINES = ("WanPipeline", "WanImageToVideoPipeline")


def read_pipeline_index(folder: Path) -> dict:
    index = read_json(folder / "model_index.json", INCOMPLETE)
    if not isinstance(index, dict) or index.get("_class_name") not in PIPELINES:
        raise SoragenError(f"{folder / 'model_index.json'}: soragen runs diffusers' WanPipeline (Wan 2.1 text to "
                           f"video) and WanImageToVideoPipeline, not "
                           f"{index.get('_class_name') if isinstance(index, dict) else index!r}")
    second, ratio = (index.get("transformer_2") or [None])[0] is not None, index.get("boundary_ratio")
    if second != (ratio is not None):
        raise SoragenError(f"{folder / 'model_index.json'}: a second transformer and a boundary_ratio go together "
                           f"(Wan 2.2 A14B), not one without the other")
    if second and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1):
        raise SoragenError(f"{folder / 'model_index.json'}: boundary_ratio must be a number between 0 and 1 (the "
                           f"share of the timesteps the first expert denoises from), got {ratio!r}")
    return index


def pipeline_image_inputs(folder: Path, index: dict, transformer: dict) -> int:
    """The images a pipeline folder's videos start from: Wan 2.2 TI2V-5B's first frame
    (expand_timesteps), an image-to-video model's first frame, FLF2V's first and last (its image
    tokens have learned positions for two images); 0 for text-to-video."""
    if index.get("expand_timesteps"):
        return 1
    if index["_class_name"] != "WanImageToVideoPipeline":
        return 0
    if transformer.get("image_dim") and (index.get("image_encoder") or [None])[0] is None:
        raise SoragenError(f"{folder / 'model_index.json'}: the transformer cross-attends to an image encoder's "
                           f"tokens (image_dim), and the pipeline names no image_encoder")
    return 2 if transformer.get("pos_embed_seq_len") else 1


def image_encoder_spec(folder: Path, source: str, config: DiTConfig) -> ImageEncoderSpec | None:
    """Wan 2.1 I2V's CLIP vision tower, by reference, checked to give the tokens the DiT takes."""
    if not config.image_dim:
        return None
    encoder = read_json(folder / "image_encoder" / "config.json", INCOMPLETE)
    width = encoder.get("hidden_size") if isinstance(encoder, dict) else None
    if width != config.image_dim:
        raise SoragenError(f"{folder / 'image_encoder' / 'config.json'}: the image encoder gives {width!r}-d tokens, "
                           f"the transformer takes {config.image_dim}-d ones (image_dim)")
    return ImageEncoderSpec(source=source)


def load_pipeline_folder(folder: Path, source: str, dtype: torch.dtype = torch.float32):
    """A diffusers WanPipeline or WanImageToVideoPipeline folder (model_index.json, transformer/,
    vae/, text_encoder/, tokenizer/, scheduler/; image_encoder/ for Wan 2.1 I2V) as our Model: the
    transformer as our DiT, the VAE as it is, the text and image encoders by reference (they load
    from the folder), its scheduler config, the pipeline's defaults."""
    from soragen.models.model import Model, check_latent_channels
    from soragen.models.vae import load_vae

    index = read_pipeline_index(folder)
    scheduler_config = read_schedule(folder)
    sampling = SamplingDefaults(**WAN_SAMPLING)
    check_sampler(sampling.sampler, scheduler_config, folder / "scheduler" / "scheduler_config.json")
    text = text_encoder_spec(folder, source)
    dit = load_transformer(folder / "transformer", dtype)
    images = pipeline_image_inputs(folder, index, read_transformer_config(folder / "transformer"))
    image_encoder = image_encoder_spec(folder, source, dit.config)
    dit_2, boundary = None, None
    if index.get("boundary_ratio") is not None:  # Wan 2.2 A14B: the second expert takes the low-noise steps
        dit_2 = load_transformer(folder / "transformer_2", dtype)
        if dit_2.config != dit.config:
            raise SoragenError(f"{folder / 'transformer_2'}: the second expert's config differs from the first's")
        boundary = index["boundary_ratio"] * scheduler_config.get("num_train_timesteps", 1000)
    vae = load_vae(folder / "vae")
    check_latent_channels(dit.config, vae, folder)
    if (dit.config.in_channels != vae.latent_channels) != (images > 0 and not index.get("expand_timesteps")):
        raise SoragenError(f"{folder}: a {index['_class_name']} whose transformer takes {dit.config.in_channels} "
                           f"channels of a {vae.latent_channels}-channel VAE: soragen cannot tell what they are")
    # Wan 2.2 TI2V-5B gives every token its own timestep (expand_timesteps): from text alone all of
    # them are the step's, so one modulation of the step serves every token, as it does for Wan 2.1.
    video = VideoDefaults(**(WAN_TI2V_VIDEO if index.get("expand_timesteps") else WAN_VIDEO))
    return Model(dit, vae, text, video, scheduler_config, sampling, folder, FAMILY, dit_2, boundary, images,
                 image_encoder)


def from_diffusers(transformer) -> "torch.nn.Module":
    """Our VideoDiT with the weights of a WanTransformer3DModel in memory (through the same key map
    as the files), in its dtype."""
    from soragen.models.dit import VideoDiT
    config = dit_config(dict(transformer.config))
    theirs = transformer.state_dict()
    with torch.device("meta"):
        dit = VideoDiT(config)
    state = {rule.key: combine(rule, [theirs[s] for s in rule.sources]).clone() for rule in config_key_map(config)}
    dit.load_state_dict(state, strict=True, assign=True)
    return dit.eval().requires_grad_(False)


# ---- the family: what the registry asks ----------------------------------------------------------

class WanFamily(Family):
    """Wan 2.1 text-to-video: diffusers WanPipeline folders (a hub id is fetched into one), and
    soragen folders exported from them."""

    name = "wan"

    def recognises(self, folder: Path) -> bool:
        return (folder / "model_index.json").is_file()

    def image_inputs(self, folder: Path) -> int:
        return pipeline_image_inputs(folder, read_pipeline_index(folder), read_transformer_config(folder / "transformer"))

    def load(self, folder: Path, source: str, dtype: torch.dtype):
        return load_pipeline_folder(folder, source, dtype)

    def configs(self, folder: Path) -> tuple[DiTConfig, TextEncoderSpec]:
        read_pipeline_index(folder)
        return dit_config(read_json(folder / "transformer" / "config.json", INCOMPLETE)), text_encoder_spec(folder, str(folder))

    def lora_names(self, depth: int) -> dict[str, tuple[str, int, int]]:
        """diffusers' Wan linear names, from the weights' key map (a fused q/k/v is three parts)."""
        out = {}
        for rule in key_map(depth):
            if not rule.key.endswith(".weight") or rule.how == "conv":
                continue
            for i, source in enumerate(rule.sources):
                out[source.removesuffix(".weight")] = (rule.key.removesuffix(".weight"), i, len(rule.sources))
        return out

    def lora_targets(self, config: DiTConfig) -> dict[str, tuple[str, int, int, str]]:
        """diffusers' Wan parameter names, from the weights' key map: their name -> (our tensor,
        which part of its rows, of how many equal parts, how: copy | cat | conv)."""
        return {source: (rule.key, i, len(rule.sources), rule.how) for rule in config_key_map(config)
                for i, source in enumerate(rule.sources)}

    def lora_delta(self, how: str, delta: torch.Tensor) -> torch.Tensor:
        return combine(Rule("", [], how), [delta]) if how == "conv" and delta.dim() == 5 else delta

    def lora_tensors(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
        """diffusers' own conversion of the original Wan (LightX2V, Lightning, CausVid) and
        kohya / musubi-tuner layouts (given tensors, never a file to unpickle), and the deltas its
        converter drops (soragen.families.wan_lora.split_deltas): (lora tensors, their parameter -> delta)."""
        from diffusers.loaders import WanLoraLoaderMixin

        from soragen.families.wan_lora import split_deltas
        tensors, deltas = split_deltas(tensors)
        return (WanLoraLoaderMixin.lora_state_dict(tensors) if tensors else {}), deltas


FAMILY = WanFamily()
