"""Multimodal GPT on Phi-2: CLIP vision + Whisper speech + Phi-2, served by Triton."""
