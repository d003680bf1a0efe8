"""text.py: prompts -> the text context the UNet cross-attends to, per family: the tokenizer and the encoding.

SD v1 conditions on CLIP ViT-L/14's last hidden states (Rombach et al., arXiv 2112.10752, Sec. 4.3.2); SD 2.x on
OpenCLIP ViT-H/14's penultimate block, through the tower's final layer norm (FrozenOpenCLIPEmbedder, layer
"penultimate", in https://github.com/Stability-AI/stablediffusion/blob/cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf/ldm/modules/encoders/modules.py).
configs.infer_configs builds that as a CLIPTextModel one layer short of the tower, so for both families the
context is the text encoder's last_hidden_state.
"""
import sys

import torch
from transformers import CLIPTokenizer

from files import LoadError, first_line

CLIP_MAX_LEN = 77  # CLIP's context length: prompts are padded/truncated to 77 tokens
DEFAULT_TOKENIZER = "openai/clip-vit-large-patch14"  # SD v1's FrozenCLIPEmbedder (v1-inference.yaml)
# The padding token each family's text encoder was trained with, where the tokenizer's own may differ. OpenCLIP's
# tokenizer has OpenAI CLIP's vocabulary (open_clip's bpe_simple_vocab_16e6) but pads with token 0, "!" (the
# pad_token of stabilityai/stable-diffusion-2's tokenizer); OpenAI's pads with its end token.
PAD = {"sd2": "!"}


def load_tokenizer(name, vocab_size, family=None):
    """CLIPTokenizer `name` (a folder or hub id), checked against the text encoder's vocab_size; it pads as
    `family`'s text encoder was trained (None: as the tokenizer says, e.g. a diffusers folder's own)."""
    try:  # transformers 5 quietly returns an empty tokenizer for a repo it cannot find: check the size too
        tok = CLIPTokenizer.from_pretrained(name)
        problem = f"{len(tok)} tokens for {vocab_size} embeddings" if len(tok) != vocab_size else ""
    except Exception as e:  # offline hub, missing folder: whatever transformers raises
        problem = first_line(e)
    if problem:
        raise LoadError(f"cannot load the CLIP tokenizer {name} (offline? pass a folder): {problem}")
    tok.pad_token = PAD.get(family, tok.pad_token)
    return tok


@torch.no_grad()
def encode(tokenizer, text_encoder, prompts, warned):
    """Prompts -> the text encoder's last hidden states [B, 77, D]. A prompt past 77 tokens is cut: the first
    time (prompts not in the set `warned`, which gains them), say so."""
    for prompt in set(prompts) - warned:
        warned.add(prompt)
        ids = tokenizer(prompt, add_special_tokens=False, truncation=True, max_length=10 ** 6).input_ids
        if len(ids) > CLIP_MAX_LEN - 2:  # 75 fit between the start and end tokens
            print(f"warning: {prompt[:40]!r}... is longer than CLIP's {CLIP_MAX_LEN} tokens and cut; the "
                  f"first dropped word: {tokenizer.decode(ids[CLIP_MAX_LEN - 2:][:1])!r}", file=sys.stderr)
    ids = tokenizer(list(prompts), padding="max_length", max_length=CLIP_MAX_LEN, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device)).last_hidden_state
