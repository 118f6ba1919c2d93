"""The model on the tiny preset: image features, splicing, left padding, the KV cache."""

import numpy as np
import pytest
import torch

from mmgpt.model import build_projector, position_ids_from_mask, splice_embeddings
from mmgpt.runtime import splice_numpy


@pytest.fixture(scope="module")
def model(tiny_components):
    return tiny_components.model


def test_patch_features_from_penultimate_layer_without_cls(model):
    cfg = model.config
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    feats = model.image_features(pixels)
    assert feats.shape == (2, cfg.num_image_tokens, cfg.vision_hidden_size)  # (B, N, Dv): one per patch
    hidden = model.vision(pixel_values=pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(feats, hidden[-2][:, 1:])  # penultimate layer, CLS dropped
    assert not torch.allclose(feats, hidden[-1][:, 1:])
    table = model.encode_images(pixels)
    assert table.shape == (2, cfg.num_image_tokens, cfg.llm_hidden_size)


def test_vision_is_frozen(model):
    assert not any(p.requires_grad for p in model.vision.parameters())
    model.train()
    assert not model.vision.training
    model.eval()


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu"])
def test_projector_types(kind):
    proj = build_projector(kind, 8, 16)
    assert proj(torch.randn(2, 3, 8)).shape == (2, 3, 16)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in proj.modules())
    assert n_linear == (1 if kind == "linear" else 2)


def test_splice_puts_table_rows_at_image_positions():
    V, D = 10, 4
    emb = torch.nn.Embedding(V, D)
    table = torch.randn(2, 3, D)
    ids = torch.tensor([[1, V + 0, V + 1, V + 2, 5], [V + 2, V + 0, 3, 4, 6]])
    out = splice_embeddings(ids, emb, table, V)
    torch.testing.assert_close(out[0, 1:4], table[0])
    torch.testing.assert_close(out[1, 0], table[1, 2])
    torch.testing.assert_close(out[1, 1], table[1, 0])
    torch.testing.assert_close(out[0, 0], emb.weight[1])
    torch.testing.assert_close(out[1, 4], emb.weight[6])
    # the numpy twin used by the server splices identically
    np.testing.assert_allclose(splice_numpy(ids.numpy(), emb.weight.detach().numpy(), table.numpy(), V), out.detach().numpy(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no image features"):
        splice_embeddings(ids, emb, None, V)


def test_left_padded_batch_matches_single_rows(model, tiny_components):
    from mmgpt.template import prompt_ids

    cfg, tok = model.config, tiny_components.tokenizer
    a = prompt_ids(cfg, tok, [], "What is in the image?", has_image=True)
    b = prompt_ids(cfg, tok, [], "Hi", has_image=True)
    table = torch.randn(2, cfg.num_image_tokens, cfg.llm_hidden_size)
    T = max(len(a), len(b))
    ids = torch.full((2, T), tok.pad_token_id)
    mask = torch.zeros(2, T, dtype=torch.long)
    for row, seq in enumerate((a, b)):
        ids[row, T - len(seq):] = torch.tensor(seq)
        mask[row, T - len(seq):] = 1
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, prompt_table=table).logits
        for row, seq in enumerate((a, b)):
            single = model(input_ids=torch.tensor([seq]), prompt_table=table[row:row + 1]).logits[0]
            torch.testing.assert_close(batched[row, T - len(seq):], single, atol=1e-4, rtol=1e-4)
    assert position_ids_from_mask(mask)[1, T - len(b)] == 0


def test_kv_cache_steps_equal_full_forward(model, tiny_components):
    from mmgpt.inference import TorchLLM

    cfg = model.config
    ids = np.array(tiny_components.tokenizer.encode("a red circle on a white background"), np.int64)
    dec = TorchLLM(model)
    logits = [dec.prefill(ids[:3], None)]
    for t in ids[3:]:
        logits.append(dec.step(int(t)))
    with torch.no_grad():
        full = model(input_ids=torch.from_numpy(ids)[None]).logits[0, 2:].numpy()
    np.testing.assert_allclose(np.stack(logits), full, atol=1e-4)
    assert cfg.llm_vocab_size == full.shape[-1]


def test_loss_masks_ignored_labels(model):
    ids = torch.tensor([[5, 6, 7, 8]])
    labels = torch.tensor([[-100, -100, 7, 8]])
    out = model(input_ids=ids, labels=labels)
    logits = out.logits[0, :-1]
    manual = torch.nn.functional.cross_entropy(logits[1:], ids[0, 2:])
    torch.testing.assert_close(out.loss, manual)
