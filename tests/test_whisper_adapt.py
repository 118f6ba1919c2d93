"""Whisper's adapter for the toy world: what it is trained on, and in which voices."""

from mmgpt.template import IGNORE_INDEX
from mmgpt.toy import speech
from mmgpt.toy.whisper_adapt import decoder_example, training_questions


def test_the_adapter_never_hears_a_held_out_voice():
    from mmgpt.tts import resolve_voice

    held = {resolve_voice(v).split("+")[0] for v in speech.HELDOUT_VOICES}
    for voice in speech.ADAPT_VOICES:
        for variant in speech.ADAPT_VARIANTS:
            assert resolve_voice(voice + variant).split("+")[0] not in held, voice + variant
    assert set(speech.ADAPT_VARIANTS).isdisjoint({"+f2", "+f3", "+f5", "+whisper"})  # unseeded breath noise


def test_decoder_examples_learn_the_transcript_and_its_end_after_the_prompt():
    from transformers import AutoTokenizer

    from mmgpt.whisper_ct2 import tiny_en_dir, tiny_en_speech_config

    tok = AutoTokenizer.from_pretrained(tiny_en_dir())
    sp = tiny_en_speech_config(tok, initial_prompt=speech.INITIAL_PROMPT)
    ids, labels = decoder_example("Is the red heart small?", tok, sp)
    assert len(ids) == len(labels) and ids[: len(sp.prompt_ids)] == list(sp.prompt_ids)
    learned = [k for k, y in enumerate(labels) if y != IGNORE_INDEX]
    assert learned[0] == len(sp.prompt_ids) - 1  # the first word is predicted from <|notimestamps|>
    assert all(labels[k] == ids[k + 1] for k in learned[:-1]) and labels[-1] == sp.eot_id
    assert tok.decode([labels[k] for k in learned]) == " Is the red heart small?<|endoftext|>"


def test_training_questions_are_the_worlds_training_questions(tmp_path):
    import json

    from mmgpt.toy import generate

    generate.write_world(tmp_path, train_images=40, eval_images=4, compositional_images=2, seed=3, progress=False)
    asked = {t["value"].replace("<image>", "").strip()
             for c in json.loads((tmp_path / "llava_instruct_train.json").read_text())
             for t in c["conversations"] if t["from"] == "human"}
    picked = training_questions(tmp_path, 30, seed=0)
    assert len(set(picked)) == 30 and set(picked) <= asked
    # only as Whisper writes them: the world also types "what color is it" (for the LLM's sake)
    assert any(not (q[0].isupper() and q.endswith(("?", "."))) for q in asked)
    assert all(q[0].isupper() and q.endswith(("?", ".")) for q in picked)
    assert picked == training_questions(tmp_path, 30, seed=0) != training_questions(tmp_path, 30, seed=1)
