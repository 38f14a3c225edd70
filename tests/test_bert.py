"""soragen's own BERT (soragen.models.bert) against transformers' BertModel and tokenizer: the same
ids and the same bits, on the packaged MiniLM and on a tiny BERT with every parameter random. The
real transformers classes are the reference; `bert.supports` picks which one TextEncoder runs."""

import shutil

import pytest
import torch

from soragen.core.config import TextEncoderSpec
from soragen.core.errors import SoragenError
from soragen.models import bert
from soragen.models.text import TextEncoder, default_encoder_path

PROMPTS = ["a red ball moving right in the blue sky", "", "Café déjà vu — naïve façade 東京 🙂 tabs\tand  spaces",
           "sora is sky " * 20, "UPPER lower MiXeD 123,456.78!?"]
BATCHES = [PROMPTS[:1], PROMPTS[1:2], PROMPTS, [PROMPTS[0], ""]]


def random_bert(folder, layer_norm_eps=1e-5):
    """A 2-layer BERT with MiniLM's vocabulary, every weight random, saved with MiniLM's tokenizer files."""
    from transformers import BertConfig, BertModel
    g = torch.Generator().manual_seed(3)
    model = BertModel(BertConfig(vocab_size=30522, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=96, max_position_embeddings=64, layer_norm_eps=layer_norm_eps))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(default_encoder_path() / name, folder / name)
    return model.eval()


def assert_same(tokenizer, model, ref_tokenizer, ref_model, max_length):
    for padding in ("longest", "max_length"):
        for batch in BATCHES:
            want = ref_tokenizer(batch, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
            got = tokenizer(batch, padding=padding, truncation=True, max_length=max_length)
            assert torch.equal(got["input_ids"], want["input_ids"]), batch
            assert torch.equal(got["attention_mask"], want["attention_mask"]), batch
            with torch.no_grad():
                a = ref_model(input_ids=want["input_ids"], attention_mask=want["attention_mask"]).last_hidden_state
                b = model(input_ids=got["input_ids"], attention_mask=got["attention_mask"]).last_hidden_state
            assert torch.equal(a, b), (padding, batch, (a - b).abs().max())


def test_the_packaged_minilm_gives_transformers_bits():
    from transformers import AutoModel, AutoTokenizer
    folder = default_encoder_path()
    encoder = TextEncoder(TextEncoderSpec())
    assert isinstance(encoder.model, bert.Bert) and encoder.kind == "bert" and encoder.dim == 384
    ref = AutoModel.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=False).eval()
    assert_same(encoder.tokenizer, encoder.model, AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False), ref, 32)


def test_a_random_bert_gives_transformers_bits_and_the_same_embeddings(tmp_path, monkeypatch):
    from transformers import AutoTokenizer
    ref = random_bert(tmp_path)
    spec = TextEncoderSpec(source=str(tmp_path), max_length=40)
    ours = TextEncoder(spec)
    assert isinstance(ours.model, bert.Bert)
    assert_same(ours.tokenizer, ours.model, AutoTokenizer.from_pretrained(str(tmp_path), trust_remote_code=False), ref, 40)
    monkeypatch.setattr(bert, "supports", lambda *a: False)  # the same folder through transformers
    theirs = TextEncoder(spec)
    assert not isinstance(theirs.model, bert.Bert)
    a, b = ours.encode(PROMPTS), theirs.encode(PROMPTS)
    for x, y in ((a.tokens, b.tokens), (a.mask, b.mask), (a.pooled, b.pooled)):
        assert torch.equal(x, y)


def test_what_it_does_not_reproduce_goes_to_transformers(tmp_path):
    import json
    random_bert(tmp_path)
    assert bert.supports(tmp_path, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for change in ({"position_embedding_type": "relative_key"}, {"hidden_act": "relu"}, {"is_decoder": True},
                   {"model_type": "roberta"}, {"hidden_size": "48"}):
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        assert not bert.supports(tmp_path, tmp_path), change
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.json").unlink()
    assert not bert.supports(tmp_path, tmp_path)


def test_damaged_files_name_themselves(tmp_path):
    random_bert(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(SoragenError, match="tokenizer.json"):
        bert.Tokenizer(tmp_path)
    model = tmp_path / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-100])
    with pytest.raises(SoragenError, match="model.safetensors"):
        bert.load_bert(tmp_path, torch.float32)
