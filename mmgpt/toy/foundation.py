"""The toy world's foundation models, trained from scratch: what Phi-2, CLIP and their tokenizer are to the
real preset, made here because nothing can be downloaded.

    python -m mmgpt.toy.foundation --world runs/toy/world --whisper DIR --out runs/toy/base

- a byte-level BPE tokenizer trained on the world's text (every word of the world is one token; any text
  still encodes, byte by byte);
- a CLIP vision tower (`CLIPModel` with a small text tower, trained contrastively on the COCO-format
  image/caption pairs; only the vision tower is kept, as `CLIPVisionModel`, the class the real one loads as);
- a Phi language model (`PhiForCausalLM`) trained on the world's text: the captions and the training
  conversations in the chat template, each picture written as nine cell words where its image goes (see
  `lm_corpus`);
- a checkpoint in the project's format (`mmgpt_config.json`, preset "toy") with a fresh projector, ready for
  `make pretrain INIT=...` (stage 1) exactly like a `phi-2` start checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmgpt.config import MMGPTConfig, SpeechConfig
from mmgpt.speech import speech_config_for
from mmgpt.template import IGNORE_INDEX, Message, encode_for

logger = logging.getLogger("mmgpt.toy.foundation")

SYSTEM_PROMPT = "Answer questions about the picture."  # short: the toy trains on 2 cores, every token counts
VISION_FEATURE_LAYER = -2  # LLaVA's choice, as for the real towers
# The LM's input embeddings start at N(0, 1), PyTorch's default, not at HF's N(0, 0.02): a fresh projector
# puts out vectors of norm ~20, and with words at norm 0.3 stage 1 could not bring the image down to their
# scale (it grew instead, to ~170: behind Phi's pre-LayerNorm the loss hardly sees the scale of an input that
# dwarfs every layer's update), so the LM read the image as noise. At N(0, 1) both start at the same scale.
EMBEDDING_STD = 1.0
EXTRA_ID_OFFSET = 10_000_000  # extra scenes for the vision tower are drawn in memory under ids no dataset image has


@dataclass(frozen=True)
class ToyArch:
    """Sizes of the from-scratch models; each is also saved in its HF config.json."""

    vocab_size: int = 1024  # most BPE tokens (bytes + merges + specials); the world's text needs ~600
    image_size: int = 96
    patch_size: int = 32  # 3 x 3 = 9 image tokens: one per cell of the world's grid (ViT-B/32's patch)
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 2
    text_hidden: int = 128  # CLIP's text tower: only used to train the vision tower, then dropped
    text_layers: int = 2
    projection_dim: int = 128
    llm_hidden: int = 128  # d=128 learned the world's questions faster per second of CPU than d=256
    llm_layers: int = 4
    llm_heads: int = 4
    llm_ffn: int = 512
    # Normalized queries and keys (Phi's own option, off in Phi-2): without them lr 1e-2 diverged and 6e-3
    # was at the edge; with them 6e-3 trains smoothly, and the LM is step-bound on 2 cores.
    llm_qk_layernorm: bool = True
    max_context: int = 512


# ============================================================================================ data


def world_texts(world: Path) -> tuple[list[tuple[int, str]], list[dict]]:
    """(image_id, caption) pairs and the LLaVA training entries of a generated world."""
    coco = json.loads((world / "captions_train2014.json").read_text())
    pairs = [(a["image_id"], a["caption"]) for a in coco["annotations"]]
    entries = json.loads((world / "llava_instruct_train.json").read_text())
    return pairs, entries


def conversation_messages(entry: dict) -> list[Message]:
    from mmgpt.training.data import strip_image_token

    roles = {"human": "user", "gpt": "assistant"}
    return [Message(roles[t["from"]], strip_image_token(t["value"]) if k == 0 else t["value"])
            for k, t in enumerate(entry["conversations"])]


def embedding_rows(tokenizer) -> int:
    """The LM's vocabulary: the tokenizer's size rounded up to a multiple of 64 (as Phi-2 pads 50295 to 51200)."""
    return -(-len(tokenizer) // 64) * 64


def tokenizer_texts(world: Path) -> list[str]:
    """What the tokenizer learns its merges from: captions and conversations as the chat template writes
    them, so "User:" and "Assistant:" are single tokens too."""
    pairs, entries = world_texts(world)
    texts = [c for _, c in pairs] + [SYSTEM_PROMPT]
    for e in entries:
        texts.append("\n".join(f"User: {m.content}" if m.role == "user" else f"Assistant: {m.content}"
                               for m in conversation_messages(e)))
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    from mmgpt.presets import EOS, PAD, byte_level_bpe, wrap_tokenizer

    return wrap_tokenizer(byte_level_bpe(texts, vocab_size, [EOS, PAD]))


# ========================================================================================= training


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _fit(model, params, batches, steps: int, lr: float, desc: str, progress: bool, weight_decay: float = 0.01):
    """A plain AdamW loop with warm-up + cosine decay; `batches(step)` returns the loss of a step."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, max(1, steps // 20)))
    losses = []
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    model.train()
    for step in bar:
        loss = batches(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def image_processor(arch: ToyArch):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": arch.image_size}, crop_size={"height": arch.image_size, "width": arch.image_size}
    )


def read_scenes(world: Path) -> list:
    from .world import scene_from_dict

    lines = (world / "scenes_train.jsonl").read_text().splitlines()
    return [scene_from_dict(json.loads(line)) for line in lines if line.strip()]


def scene_pixels(scenes, world: Path | None, processor, progress: bool, desc: str) -> torch.Tensor:
    """Scenes through the serving preprocessing: (N, 3, S, S) float16. With `world`, the image files are
    read (JPEG artifacts and all); without, the scenes are drawn in memory."""
    from mmgpt.preprocess import image_pixels, pixel_values
    from mmgpt.training.data import ImageIndex

    from .world import draw

    if world is None:
        chunks = [scenes[i : i + 256] for i in range(0, len(scenes), 256)]
        return torch.cat([
            torch.from_numpy(pixel_values([draw(s) for s in chunk], processor)).half()
            for chunk in tqdm(chunks, desc=desc, unit="batch", disable=not progress)
        ])
    index = ImageIndex(world / "images")
    out = []
    for s in tqdm(scenes, desc=desc, unit="img", disable=not progress):
        data = index.resolve(image_id=s.image_id).read_bytes()
        out.append(torch.from_numpy(image_pixels(data, processor)[0]).half())
    return torch.stack(out)


def cell_labels(scenes) -> torch.Tensor:
    """(N, 9, 3): per grid cell, the index of its shape, color and size (0 = empty)."""
    from .world import COLORS, SHAPES, SIZES

    out = torch.zeros(len(scenes), 9, 3, dtype=torch.long)
    for n, s in enumerate(scenes):
        for it in s.items:
            out[n, 3 * it.row + it.col] = torch.tensor([
                1 + SHAPES.index(it.shape), 1 + list(COLORS).index(it.color), 1 + SIZES.index(it.size)])
    return out


class CellHead(torch.nn.Module):
    """Reads each grid cell's patch features (the features the projector will see) into shape, color and
    size logits; only used while the tower trains."""

    def __init__(self, arch: ToyArch):
        from .world import COLORS, SHAPES, SIZES

        super().__init__()
        self.k = arch.image_size // arch.patch_size // 3  # patches per cell side
        self.sizes = (1 + len(SHAPES), 1 + len(COLORS), 1 + len(SIZES))
        self.linear = torch.nn.Linear(arch.vision_hidden * self.k * self.k, sum(self.sizes))

    def loss(self, patches: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b, _, d = patches.shape  # (B, P, D), P = (3k)^2
        cells = patches.reshape(b, 3, self.k, 3, self.k, d).permute(0, 1, 3, 2, 4, 5).reshape(b, 9, -1)
        logits = self.linear(cells).split(self.sizes, dim=-1)
        return sum(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels[..., i].reshape(-1)) for i, lg in enumerate(logits))


def train_vision(world: Path, tokenizer, arch: ToyArch, *, steps: int, batch_size: int, lr: float, seed: int,
                 extra_scenes: int, progress: bool = True):
    """The CLIP vision tower: returns (CLIPVisionModel, processor, losses).

    CLIP's contrastive loss between each image and its full description, plus an annotation loss on the
    patch features the projector reads: each grid cell's shape, color and size (from scenes_train.jsonl,
    the world's instance annotations), through a linear head that is thrown away. Why both: measured with a
    per-cell probe on held-out images after the same compute, contrastive training alone encoded color
    (100%) but hardly shape (26%, chance is 17%), a CoCa-style captioning loss on top reached 80%, and the
    annotation loss 98%. Contrastive negatives are told apart by color long before shape matters.
    The training images are joined by `extra_scenes` more scenes of the training distribution drawn in
    memory (never a held-out color+shape pair): with only the dataset's images the tower overfits them.
    """
    from dataclasses import replace

    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    from .world import describe, random_scene

    torch.manual_seed(seed)
    rng = random.Random(seed)
    scenes = read_scenes(world)
    extra = [replace(random_scene(rng, EXTRA_ID_OFFSET + k), image_size=arch.image_size, jpeg_quality=0)
             for k in range(extra_scenes)]
    processor = image_processor(arch)
    pixels = torch.cat([scene_pixels(scenes, world, processor, progress, "reading images"),
                        scene_pixels(extra, None, processor, progress, "drawing more scenes")])
    everything = scenes + extra
    labels = cell_labels(everything)
    texts = [tokenizer.encode(describe(s)) + [tokenizer.eos_token_id] for s in everything]
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=arch.text_hidden, intermediate_size=4 * arch.text_hidden,
            num_hidden_layers=arch.text_layers, num_attention_heads=max(1, arch.text_hidden // 64),
            max_position_embeddings=max(map(len, texts)), eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            hidden_size=arch.vision_hidden, intermediate_size=4 * arch.vision_hidden,
            num_hidden_layers=arch.vision_layers, num_attention_heads=arch.vision_heads,
            image_size=arch.image_size, patch_size=arch.patch_size,
        ),
        projection_dim=arch.projection_dim,
    )
    model = CLIPModel(cfg)
    head = CellHead(arch)
    picker = np.random.default_rng(seed)

    def batch_loss(step: int) -> torch.Tensor:
        picked = picker.choice(len(everything), size=min(batch_size, len(everything)), replace=False)
        caps = [texts[k] for k in picked]
        length = max(len(c) for c in caps)
        input_ids = torch.full((len(caps), length), tokenizer.pad_token_id)
        mask = torch.zeros((len(caps), length), dtype=torch.long)
        for i, c in enumerate(caps):
            input_ids[i, : len(c)] = torch.tensor(c)
            mask[i, : len(c)] = 1
        out = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels[picked].float(), return_loss=True,
                    output_hidden_states=True)
        patches = out.vision_model_output.hidden_states[VISION_FEATURE_LAYER][:, 1:]  # what MultimodalPhi.image_features returns
        return out.loss + head.loss(patches, labels[picked])

    params = list(model.parameters()) + list(head.parameters())
    losses = _fit(model, params, batch_loss, steps, lr, "vision tower (contrastive + cells)", progress, 0.1)
    vision = CLIPVisionModel(cfg.vision_config)
    vision.vision_model.load_state_dict(model.vision_model.state_dict())
    return vision.eval(), processor, losses


def cell_word(item) -> int:
    """What a cell shows as an index (0 is an empty cell)."""
    from .world import COLORS, SHAPES, SIZES

    return 1 + (SHAPES.index(item.shape) * len(COLORS) + list(COLORS).index(item.color)) * len(SIZES) + SIZES.index(item.size)


def n_contents() -> int:
    from .world import COLORS, SHAPES, SIZES

    return 1 + len(SHAPES) * len(COLORS) * len(SIZES)


def cell_words(scene) -> list[int]:
    """The nine cell words of a scene, row by row (the order of the vision tower's patches): word
    `k * n_contents() + content` says what cell k shows."""
    contents = [0] * 9
    for it in scene.items:
        contents[3 * it.row + it.col] = cell_word(it)
    return [k * n_contents() + c for k, c in enumerate(contents)]


def lm_corpus(world: Path, tokenizer, config: MMGPTConfig, seed: int, extra_conversations: int = 0,
              extra_turns: tuple[int, ...] = (6, 8, 10), captions_per_image: int = 1) -> list[tuple[list[int], list[int]]]:
    """The LM's training text as (token ids, labels): the captions and the conversations in the chat template that
    stages 1 and 2 use, with each picture written where its image goes as nine *cell words*, one per grid
    cell in the order of the vision tower's patches (id `llm_vocab_size + word`, see `cell_words`), plus
    `extra_conversations` of `extra_turns` turns about scenes drawn in memory (never a held-out color+shape
    pair; a scene costs nothing to draw here, it is never rendered), and `captions_per_image` of each
    training image's captions.

    Why long extra conversations and one caption per image: the LM is bound by optimizer steps, and every
    document pays for its system prompt, template and nine cell words before its first answer. Measured by
    answering held-out questions from the true cell words after 1,600 steps of 16 documents: extras of 2-4
    turns with all five captions reached vqa 0.44 / multi-turn 0.58, extras of 6-10 turns with one caption
    per image (and normalized queries and keys, lr 6e-3) 0.59 / 0.69.

    Why cell words: a real LLaVA starts from an LM that already reads and answers; the projector only has
    to make the image say what the LM can read. Tried first, with the picture written out as its ~30-word
    description before the question, the LM learned to answer from the description, but nine projected
    patches could not stand in for thirty words, and after stages 1 and 2 the answers ignored the image
    (vqa 0.35). With one slot per cell, stage 1 has one job per patch: make its projection read as that
    cell's word. The cell words' embeddings are trained with the LM and then thrown away; only the
    projector speaks them.
    """
    from mmgpt.training.collate import caption_messages
    from mmgpt.training.data import parse_image_id

    from .generate import conversation, llava_entry
    from .world import random_scene

    pairs, entries = world_texts(world)
    scenes = {s.image_id: s for s in read_scenes(world)}
    rng = random.Random(seed)
    for k in range(extra_conversations):
        scene = random_scene(rng, EXTRA_ID_OFFSET + k)
        scenes[scene.image_id] = scene
        name = f"COCO_train2014_{scene.image_id:012d}.png"  # a file name like the dataset's; never written
        entries.append(llava_entry(scene, name, conversation(scene, rng, rng.choice(extra_turns)), rng))
    rows = config.llm_vocab_size

    def encode(messages: list[Message], image_id: int) -> tuple[list[int], list[int]]:
        enc = encode_for(config, tokenizer, messages, add_generation_prompt=False)
        cells = cell_words(scenes[image_id])
        return [rows + cells[t - rows] if t >= rows else t for t in enc.input_ids], enc.labels

    docs = []
    for e in entries:
        messages = conversation_messages(e)
        messages[0] = Message("user", messages[0].content, image=True)
        docs.append(encode(messages, parse_image_id(e["image"])))
    taken: dict[int, int] = {}
    for image_id, c in pairs:
        taken[image_id] = taken.get(image_id, 0) + 1
        if taken[image_id] <= captions_per_image:
            docs.append(encode(caption_messages(c), image_id))
    rng.shuffle(docs)
    return docs


class CellWordLM(torch.nn.Module):
    """The Phi LM with embeddings for the cell words, used only while the LM trains.

    A cell word's embedding is a sum of parts, not a row of its own: the held-out color+shape pairs never
    occur in training, and a word of their own would stay untrained; a sum of trained parts is what the
    projector can produce for a new pair too. Its shape, color and size parts are the LM's own embeddings of
    those words (" star", " red", " big"), so a question's words and the cell that answers it start out
    sharing a vector to match on (measured on true cell words after 1,500 steps: compositional 0.74 vs 0.63
    with parts of their own); an empty cell has a learned vector instead. Its place is a row part plus a
    column part, as the tower's position embeddings say where a patch is: with rotary positions only, the
    LM had to work out which slot is which from distances, and got the places wrong long after it had the
    shapes right."""

    def __init__(self, llm, factors: torch.Tensor, word_ids: tuple[list[int], list[int], list[int]]):
        super().__init__()
        self.llm = llm
        self.rows = llm.get_input_embeddings().num_embeddings
        self.register_buffer("factors", factors, persistent=False)  # (words, 4): shape, color, size, cell
        # per factor, the token id of each value (index 0, "empty", is never looked up)
        for i, ids in enumerate(word_ids):
            self.register_buffer(f"words{i}", torch.tensor([0, *ids]), persistent=False)
        d = llm.config.hidden_size
        self.empty = torch.nn.Parameter(torch.randn(d) * EMBEDDING_STD)
        self.row = torch.nn.Embedding(3, d)
        self.col = torch.nn.Embedding(3, d)
        for part in (self.row, self.col):  # the place has the spread of a word's embedding
            torch.nn.init.normal_(part.weight, std=EMBEDDING_STD / math.sqrt(2))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        is_word = ids >= self.rows
        table = self.llm.get_input_embeddings()
        text = table(ids.masked_fill(is_word, 0))
        f = self.factors[(ids - self.rows).clamp(min=0)]
        present = (f[..., :1] > 0)
        what = sum(table(getattr(self, f"words{i}")[f[..., i]]) for i in range(3))
        cell = f[..., 3] - 1
        cells = torch.where(present, what, self.empty) + self.row(cell.clamp(min=0) // 3) + self.col(cell.clamp(min=0) % 3)
        return torch.where(is_word[..., None], cells, text)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.llm(inputs_embeds=self.embed(ids), attention_mask=attention_mask, labels=labels).loss


def factor_word_ids(tokenizer) -> tuple[list[int], list[int], list[int]]:
    """The token ids of the world's shape, color and size words (each is one token after a space)."""
    from .world import COLORS, SHAPES, SIZES

    out = []
    for words in (SHAPES, list(COLORS), SIZES):
        ids = [tokenizer.encode(" " + w, add_special_tokens=False) for w in words]
        if any(len(i) != 1 for i in ids):
            raise ValueError(f"the tokenizer does not keep every one of {words} as one token: {ids}")
        out.append([i[0] for i in ids])
    return tuple(out)


def cell_factors() -> torch.Tensor:
    """(words, 4): each cell word's shape, color and size (1-based; 0 for an empty cell) and its cell (1-9)."""
    from .world import COLORS, SHAPES, SIZES, Item

    n = n_contents()
    out = torch.zeros(9 * n, 4, dtype=torch.long)
    for k in range(9):
        out[k * n : (k + 1) * n, 3] = k + 1
        for i, shape in enumerate(SHAPES):
            for j, color in enumerate(COLORS):
                for z, size in enumerate(SIZES):
                    word = k * n + cell_word(Item(shape=shape, color=color, size=size, row=0, col=0))
                    out[word, :3] = torch.tensor([i + 1, j + 1, z + 1])
    return out


def length_batches(lengths: list[int], batch_size: int, steps: int, seed: int) -> list[np.ndarray]:
    """`steps` batches of `batch_size` documents of similar length: the corpus is sorted by length, cut into
    batches, and the batches are shuffled (again for every pass). A batch pads to its longest document, and
    the world's documents run from ~30 to ~250 tokens: random batches spent about half of every step on
    padding."""
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    while len(out) < steps:
        order = np.argsort(np.asarray(lengths) + rng.random(len(lengths)))  # equal lengths in a new order each pass
        groups = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
        out += [groups[k] for k in rng.permutation(len(groups))]
    return out[:steps]


def train_llm(docs: list[tuple[list[int], list[int]]], tokenizer, arch: ToyArch, *, steps: int, batch_size: int,
              lr: float, seed: int, progress: bool = True):
    """A Phi LM from scratch on the world's text (`lm_corpus`); returns (PhiForCausalLM, losses).

    Whole documents per batch, right-padded, and the loss on the answers only (the labels the stages use).
    Measured by answering 100 training questions from the true cell words (d=128, 1,500 steps, 30,000
    extra conversations): the loss on every token at lr 3e-3 reached 0.53 / 0.56 / 0.62 / 0.62 after
    600 / 900 / 1,200 / 1,500 steps, the loss on answers at lr 6e-3 0.48 / 0.66 / 0.76 / 0.72. The
    questions are random draws; predicting them teaches little and takes half the gradient. On held-out
    images (true cell words, 1,500 steps, 200 questions a set; vqa / compositional / multi-turn): 16
    documents at lr 6e-3 0.46 / 0.74 / 0.65, with 6 layers and 8 heads 0.54 / 0.69 / 0.64 (1.5x the time),
    32 documents at lr 2e-3 0.61 / 0.77 / 0.72 (1.9x the time). None is enough yet for the gates (vqa >= 0.95)."""
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(seed)
    cfg = PhiConfig(
        vocab_size=embedding_rows(tokenizer), hidden_size=arch.llm_hidden, intermediate_size=arch.llm_ffn,
        num_hidden_layers=arch.llm_layers, num_attention_heads=arch.llm_heads, max_position_embeddings=arch.max_context,
        partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
        qk_layernorm=arch.llm_qk_layernorm, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    llm = PhiForCausalLM(cfg)
    torch.nn.init.normal_(llm.get_input_embeddings().weight, std=EMBEDDING_STD)
    model = CellWordLM(llm, cell_factors(), factor_word_ids(tokenizer))
    logger.info("LM corpus: %d documents, %d tokens", len(docs), sum(len(d) for d, _ in docs))
    batches = length_batches([len(ids) for ids, _ in docs], batch_size, steps, seed)

    def batch_loss(step: int) -> torch.Tensor:
        picked = [docs[k] for k in batches[step]]
        length = max(len(ids) for ids, _ in picked)
        x = torch.full((len(picked), length), tokenizer.pad_token_id)
        y = torch.full((len(picked), length), IGNORE_INDEX)
        mask = torch.zeros((len(picked), length), dtype=torch.long)
        for i, (ids, labels) in enumerate(picked):
            x[i, : len(ids)], y[i, : len(ids)], mask[i, : len(ids)] = torch.tensor(ids), torch.tensor(labels), 1
        return model(x, y, mask)

    losses = _fit(model, list(model.parameters()), batch_loss, steps, lr, "language model", progress, 0.1)
    return model.llm, losses


# ========================================================================================= the base


def base_config(arch: ToyArch, tokenizer, speech: SpeechConfig, whisper_source: str = "whisper") -> MMGPTConfig:
    return MMGPTConfig(
        preset="toy", vision_source="vision", llm_source="llm", whisper_source=whisper_source,
        projector_type="mlp2x_gelu", vision_feature_layer=VISION_FEATURE_LAYER, vision_hidden_size=arch.vision_hidden,
        llm_hidden_size=arch.llm_hidden, llm_vocab_size=embedding_rows(tokenizer),
        num_image_tokens=(arch.image_size // arch.patch_size) ** 2, image_size=arch.image_size,
        max_context=arch.max_context, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        system_prompt=SYSTEM_PROMPT, speech=speech,
    )


def write_base(out: Path, arch: ToyArch, tokenizer, vision, processor, llm, whisper: Path, speech: SpeechConfig,
               seed: int) -> Path:
    """The start checkpoint: trained tower and LM, a fresh projector, and Whisper copied from `whisper`."""
    from transformers import AutoTokenizer, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from mmgpt.checkpoint import Components, save_checkpoint
    from mmgpt.model import MultimodalPhi

    torch.manual_seed(seed)
    config = base_config(arch, tokenizer, speech)
    model = MultimodalPhi(config, vision, llm)
    wmodel = WhisperForConditionalGeneration.from_pretrained(whisper, use_safetensors=True)
    c = Components(config, model, tokenizer, processor, wmodel, WhisperFeatureExtractor.from_pretrained(whisper),
                   AutoTokenizer.from_pretrained(whisper))
    return save_checkpoint(c, out, save_all=True)


def main(
    world: Path,
    whisper: Path,
    out: Path,
    initial_prompt: str = "",
    vision_steps: int = 600,
    vision_batch_size: int = 128,
    vision_lr: float = 2e-3,
    vision_extra_scenes: int = 24000,
    llm_steps: int = 600,
    llm_batch_size: int = 16,
    llm_extra_conversations: int = 30000,
    llm_extra_turns: tuple[int, ...] = (6, 8, 10),
    llm_captions_per_image: int = 1,
    llm_lr: float = 6e-3,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Train the toy world's tokenizer, CLIP vision tower and Phi LM from scratch; write a start checkpoint.

    Args:
        world: a folder written by `python -m mmgpt.toy.generate`.
        whisper: a Whisper folder (Hugging Face format) to put in the checkpoint, e.g. the converted tiny.en.
        out: the checkpoint folder to write (preset "toy", fresh projector).
        initial_prompt: Whisper's previous-text prompt (the world's vocabulary), saved in the speech config.
        vision_steps: contrastive optimizer steps for the CLIP tower.
        vision_batch_size: image/caption pairs per contrastive step (the in-batch negatives).
        vision_lr: peak learning rate of the CLIP tower.
        vision_extra_scenes: scenes drawn in memory for the tower besides the dataset's training images.
        llm_steps: optimizer steps for the language model.
        llm_batch_size: documents (conversations, captions) per LM step.
        llm_extra_conversations: conversations about scenes drawn in memory, besides the dataset's.
        llm_extra_turns: how many turns such a conversation has (one of them, drawn per conversation).
        llm_captions_per_image: how many of each training image's captions the LM reads.
        llm_lr: peak learning rate of the language model.
        seed: seeds the data order and the initial weights.
        progress: show progress bars.
    """
    # Hyper-parameters only: folders are this machine's, and the record is published beside the weights.
    args = {k: v for k, v in locals().items() if not isinstance(v, Path) and k not in ("world", "whisper", "out")}
    t0 = time.perf_counter()
    world, out, whisper = Path(world), Path(out), Path(whisper)
    arch = ToyArch()
    speech = speech_config_for(str(whisper), initial_prompt)
    tokenizer = train_tokenizer(tokenizer_texts(world), arch.vocab_size)
    vision, processor, vision_losses = train_vision(
        world, tokenizer, arch, steps=vision_steps, batch_size=vision_batch_size, lr=vision_lr, seed=seed,
        extra_scenes=vision_extra_scenes, progress=progress
    )
    t_vision = time.perf_counter() - t0
    docs = lm_corpus(world, tokenizer, base_config(arch, tokenizer, speech), seed, llm_extra_conversations,
                     tuple(llm_extra_turns), llm_captions_per_image)
    llm, llm_losses = train_llm(
        docs, tokenizer, arch, steps=llm_steps, batch_size=llm_batch_size, lr=llm_lr, seed=seed, progress=progress,
    )
    write_base(out, arch, tokenizer, vision, processor, llm, whisper, speech, seed)
    record = {
        "args": args, "arch": asdict(arch), "seconds": round(time.perf_counter() - t0, 1),
        "vision_seconds": round(t_vision, 1), "vision_loss_first_last": [vision_losses[0], vision_losses[-1]],
        "llm_loss_first_last": [llm_losses[0], llm_losses[-1]],
    }
    (out / "foundation.json").write_text(json.dumps(record, indent=1) + "\n")
    _plot(out / "foundation_loss.png", {"vision (contrastive)": vision_losses, "language model": llm_losses})
    logger.info("toy foundation written to %s in %.0f s", out, record["seconds"])
    return out


def _plot(path: Path, curves: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5))
    for ax, (name, ys) in zip(np.atleast_1d(axes), curves.items()):
        ax.plot(ys, lw=1)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    from mmgpt.training.cli import cli

    cli(main)
