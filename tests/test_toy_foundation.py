"""The toy LM's cell words: what a picture is written as while the LM learns the world's conversations."""

from __future__ import annotations

import pytest
import torch
from transformers import PhiConfig, PhiForCausalLM

from mmgpt.presets import EOS, PAD, byte_level_bpe, wrap_tokenizer
from mmgpt.toy import foundation
from mmgpt.toy.world import COLORS, SHAPES, SIZES, Item, Scene


@pytest.fixture(scope="module")
def tokenizer():
    words = " ".join([*SHAPES, *COLORS, *SIZES])
    return wrap_tokenizer(byte_level_bpe([" " + words] * 50, 400, [EOS, PAD]))


def test_a_cell_word_is_its_words_and_its_place(tokenizer):
    torch.manual_seed(0)
    llm = PhiForCausalLM(PhiConfig(vocab_size=448, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, max_position_embeddings=64))
    lm = foundation.CellWordLM(llm, foundation.cell_factors(), foundation.factor_word_ids(tokenizer))
    scene = Scene(1, (Item("star", "red", "big", 1, 2), Item("heart", "white", "small", 2, 0)),
                  ((128, 128, 128), (128, 128, 128), "flat", 0.0), 96)
    words = torch.tensor([[448 + w for w in foundation.cell_words(scene)]])
    got = lm.embed(words)[0]
    table = llm.get_input_embeddings().weight

    def word(w):
        return table[tokenizer.encode(" " + w, add_special_tokens=False)[0]]

    star = word("star") + word("red") + word("big") + lm.row.weight[1] + lm.col.weight[2]
    torch.testing.assert_close(got[5], star)
    heart = word("heart") + word("white") + word("small") + lm.row.weight[2] + lm.col.weight[0]
    torch.testing.assert_close(got[6], heart)
    torch.testing.assert_close(got[0], lm.empty + lm.row.weight[0] + lm.col.weight[0])
    # a held-out pair is a sum of trained parts too: nothing about it is a row of its own
    white_diamond = word("diamond") + word("white") + word("big")
    d = Scene(2, (Item("diamond", "white", "big", 0, 0),), scene.background, 96)
    torch.testing.assert_close(lm.embed(torch.tensor([[448 + foundation.cell_words(d)[0]]]))[0, 0],
                               white_diamond + lm.row.weight[0] + lm.col.weight[0])
    # text ids embed as text
    torch.testing.assert_close(lm.embed(torch.tensor([[5]]))[0, 0], table[5])


def test_words_the_tokenizer_splits_are_refused():
    tok = wrap_tokenizer(byte_level_bpe(["circle square"] * 10, 300, [EOS, PAD]))
    with pytest.raises(ValueError, match="one token"):
        foundation.factor_word_ids(tok)
