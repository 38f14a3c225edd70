"""Text encoders load through the real transformers path: tiny random T5 and CLIP folders made
here (config + tokenizer files), and the packaged all-MiniLM-L6-v2."""

import pytest
import torch

from soragen.core.config import TextEncoderSpec
from soragen.core.errors import SoragenError
from soragen.models.text import TextEncoder

WORDS = ["[PAD]", "[UNK]", "</s>", "a", "red", "ball", "in", "the", "sky", "sora", "is", "moving", "right"]


def save_tokenizer(folder, eos="</s>"):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, vocab[eos])])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                            eos_token=eos).save_pretrained(folder)


def make_t5(folder):
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                            pad_token_id=0, eos_token_id=2)).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def make_clip(folder):
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=len(WORDS), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=32, pad_token_id=0,
                                 eos_token_id=2)).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


@pytest.mark.parametrize("maker,kind,dim", [(make_t5, "t5", 16), (make_clip, "clip", 24)])
def test_tiny_encoders_load_and_encode(tmp_path, maker, kind, dim):
    folder = maker(tmp_path / kind)
    encoder = TextEncoder(TextEncoderSpec(source=str(folder)))
    assert encoder.kind == kind and encoder.dim == dim
    emb = encoder.encode(["a red ball in the sky", "sora is sky", ""])
    assert emb.tokens.shape[0] == 3 and emb.tokens.shape[2] == dim
    assert emb.mask.sum(1).tolist()[:2] == [7, 4]  # words + end token; shorter prompts are padded
    assert emb.pooled.shape == (3, dim)
    assert not torch.allclose(emb.pooled[0], emb.pooled[1])
    assert all(not p.requires_grad for p in encoder.model.parameters())


def test_the_packaged_default_encoder_is_minilm_and_separates_prompts():
    encoder = TextEncoder(TextEncoderSpec())
    assert encoder.dim == 384
    emb = encoder.encode(["a red ball moving right in the blue sky", "a crimson sphere heading east", "grass"])
    cos = torch.nn.functional.cosine_similarity
    # a pretrained encoder puts the paraphrase closer than an unrelated word
    assert cos(emb.pooled[0], emb.pooled[1], dim=0) > cos(emb.pooled[0], emb.pooled[2], dim=0)


def test_unknown_encoder_fails_clearly(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SoragenError, match="no config.json"):
        TextEncoder(TextEncoderSpec(source=str(tmp_path / "empty")))
