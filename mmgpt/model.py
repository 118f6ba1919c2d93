"""The multimodal model: CLIP patch features -> projector -> spliced into Phi-2's input embeddings.

    image (B, 3, H, W)
      -> CLIPVisionModel, hidden state of `vision_feature_layer`     (B, 1 + N, Dv)
      -> drop CLS: one token per patch                               (B, N, Dv)
      -> projector (linear | mlp2x_gelu)                             (B, N, D)    = the prompt table
    prompt ids (B, T): text ids < V, image positions V + k (k-th row of the prompt table)
      -> embed text ids, gather image rows                          (B, T, D)
      -> PhiForCausalLM(inputs_embeds=...)                          (B, T, V) logits

Speech does not enter here: Whisper turns it into text first (see speech.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import CLIPVisionModel, PhiForCausalLM

from mmgpt.config import MMGPTConfig


def build_projector(kind: str, vision_dim: int, llm_dim: int) -> nn.Module:
    if kind == "linear":  # the original project's projection layer
        return nn.Linear(vision_dim, llm_dim)
    if kind == "mlp2x_gelu":  # LLaVA-1.5's: better alignment for a few more parameters
        return nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
    raise ValueError(f"unknown projector type {kind!r}")


def splice_embeddings(input_ids: torch.Tensor, embed_tokens: nn.Embedding, prompt_table: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Embed text ids and put prompt-table rows at image positions (ids >= vocab_size).

    input_ids (B, T); prompt_table (B, P, D) or None; returns (B, T, D).
    """
    is_image = input_ids >= vocab_size  # (B, T)
    embeds = embed_tokens(input_ids.masked_fill(is_image, 0))  # (B, T, D)
    if prompt_table is None:
        if bool(is_image.any()):
            raise ValueError("prompt has image positions but no image features were given")
        return embeds
    rows = (input_ids - vocab_size).clamp(min=0, max=prompt_table.shape[1] - 1)  # (B, T)
    image_embeds = torch.gather(prompt_table, 1, rows.unsqueeze(-1).expand(-1, -1, prompt_table.shape[-1]))
    return torch.where(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype), embeds)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: the first real token of every row is position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class MultimodalPhi(nn.Module):
    def __init__(self, config: MMGPTConfig, vision: CLIPVisionModel, llm: PhiForCausalLM):
        super().__init__()
        self.config = config
        self.vision = vision
        self.projector = build_projector(config.projector_type, config.vision_hidden_size, config.llm_hidden_size)
        self.llm = llm
        # CLIP stays frozen in both training stages.
        self.vision.requires_grad_(False)
        self.vision.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision.eval()  # frozen tower: never in training mode (no dropout drift)
        return self

    @property
    def vocab_size(self) -> int:
        return self.config.llm_vocab_size

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch features before the projector: (B, 3, H, W) -> (B, N, Dv). Cacheable: CLIP is frozen."""
        with torch.no_grad():
            out = self.vision(pixel_values=pixel_values.to(self.vision.dtype), output_hidden_states=True)
        return out.hidden_states[self.config.vision_feature_layer][:, 1:]  # drop CLS

    def encode_images(self, pixel_values: torch.Tensor | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        """The prompt table: (B, N, D) in the LLM's embedding space, from pixels or cached features."""
        if features is None:
            features = self.image_features(pixel_values)
        proj_dtype = next(self.projector.parameters()).dtype
        return self.projector(features.to(proj_dtype))

    def embed(self, input_ids: torch.Tensor, prompt_table: torch.Tensor | None) -> torch.Tensor:
        return splice_embeddings(input_ids, self.llm.get_input_embeddings(), prompt_table, self.vocab_size)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T), image positions >= vocab_size
        attention_mask: torch.Tensor | None = None,  # (B, T) 1 = real token, left or right padding
        pixel_values: torch.Tensor | None = None,  # (B, 3, H, W)
        image_features: torch.Tensor | None = None,  # (B, N, Dv) cached CLIP features
        prompt_table: torch.Tensor | None = None,  # (B, N, D) already projected
        labels: torch.Tensor | None = None,  # (B, T), -100 where no loss
        past_key_values=None,
        position_ids: torch.Tensor | None = None,
        use_cache: bool = False,
    ):
        if prompt_table is None and (pixel_values is not None or image_features is not None):
            prompt_table = self.encode_images(pixel_values, image_features)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)[:, -input_ids.shape[1]:]
        inputs_embeds = self.embed(input_ids, prompt_table)
        # HF shifts labels inside the loss; pad/image/prompt positions carry -100 and are skipped.
        return self.llm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            labels=labels,
            use_cache=use_cache,
        )
