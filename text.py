"""text.py: prompts -> the conditioning the UNet sees, per family: the tokenizers and the encoding.

SD v1 conditions on CLIP ViT-L/14's last hidden states (Rombach et al., arXiv 2112.10752,
Sec. 4.3.2); SD 2.x on OpenCLIP ViT-H/14's penultimate block, through the tower's final layer norm
(FrozenOpenCLIPEmbedder, layer "penultimate", below). configs.infer_configs builds that as a
CLIPTextModel one layer short of the tower, so for both families the context is the text
encoder's last_hidden_state. SDXL (Podell et al., arXiv 2307.01952, Sec. 2.1-2.2) adds the `added`
vector of unet.py: see encode_xl. SD 2.x's FrozenOpenCLIPEmbedder:
Stability-AI/stablediffusion@cf1d67a6fd5e ldm/modules/encoders/modules.py
"""

import os
import sys

import torch
from transformers import CLIPTokenizer

from convert import OPENCLIP_PART, TEXT_PARTS
from files import LoadError, first_line

CLIP_MAX_LEN = 77  # CLIP's context length: prompts are padded/truncated to 77 tokens
# SD v1's FrozenCLIPEmbedder (v1-inference.yaml)
DEFAULT_TOKENIZER = "openai/clip-vit-large-patch14"
# OpenCLIP's tokenizer has OpenAI CLIP's vocabulary (open_clip's bpe_simple_vocab_16e6) but pads
# with token 0, "!" (the pad_token of stabilityai/stable-diffusion-2's tokenizer and of SDXL's
# tokenizer_2); OpenAI's pads with its end token. SD 2.x's text encoder and SDXL's second were
# trained with OpenCLIP's padding.
OPENCLIP_PAD = "!"
# The long-prompt warning remembers at most this many prompts (their hashes), then starts over: a
# server meets ever new prompts.
MAX_WARNED = 1000
# SDXL's crop (top, left) numbers: 0, 0 asks for an uncropped image (Podell et al. Sec. 2.2)
CROP = (0, 0)


def load_tokenizer(name, vocab_size, pad=None):
    """CLIPTokenizer `name` (a folder or hub id), checked against the text encoder's vocab_size; it
    pads with `pad` where given (the token its text encoder was trained with), else as the
    tokenizer says (a diffusers folder's own)."""
    # transformers 5 quietly returns an empty tokenizer for a repo it cannot find: check its size
    try:
        tok = CLIPTokenizer.from_pretrained(name)
        problem = f"{len(tok)} tokens for {vocab_size} embeddings" if len(tok) != vocab_size else ""
    except Exception as e:
        # offline hub, missing folder: whatever transformers raises
        problem = first_line(e)
    if problem:
        raise LoadError(
            f"cannot load the CLIP tokenizer {name} (offline? pass a folder): {problem}"
        )
    tok.pad_token = pad or tok.pad_token
    return tok


def load_tokenizers(source, name, family, text_configs):
    """The tokenizer of each text encoder of `family` (SDXL: two): a diffusers folder's own
    (`source`/tokenizer, tokenizer_2: they pad as the folder says), else `name`, else SD v1's,
    padding as its encoder was trained; for a single file, which has no text config, the special
    tokens of `text_configs` (CLIPTextConfigs) are the tokenizers'."""
    tokenizers = []
    for part, config in zip(TEXT_PARTS[family], text_configs):
        own = f"{source}/{part.replace('text_encoder', 'tokenizer')}"
        own = own if os.path.isdir(own) else None
        pad = OPENCLIP_PAD if OPENCLIP_PART.get(family) == part and not own else None
        tokenizer = load_tokenizer(own or name or DEFAULT_TOKENIZER, config.vocab_size, pad)
        tokenizers.append(tokenizer)

        if not os.path.isdir(source):
            special = ("bos", "eos", "pad")
            config.update({f"{s}_token_id": getattr(tokenizer, f"{s}_token_id") for s in special})
    return tokenizers


def tokenize(tokenizer, prompts, warned):
    """Token ids [B, 77]. A prompt past 77 tokens is cut: the first time (prompts whose hash is not
    in the set `warned`, which gains it), say so."""
    for prompt in set(prompts):
        if hash(prompt) in warned:
            continue
        if len(warned) >= MAX_WARNED:
            warned.clear()
        warned.add(hash(prompt))

        ids = tokenizer(prompt, add_special_tokens=False, truncation=True, max_length=10**6)
        ids = ids.input_ids
        # 75 fit between the start and end tokens
        kept = CLIP_MAX_LEN - 2
        if len(ids) > kept:
            dropped = tokenizer.decode(ids[kept:][:1])
            print(
                f"warning: {prompt[:40]!r}... is longer than CLIP's {CLIP_MAX_LEN} tokens and "
                f"cut; the first dropped word: {dropped!r}",
                file=sys.stderr,
            )

    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=CLIP_MAX_LEN,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@torch.no_grad()
def encode(tokenizer, text_encoder, prompts, warned):
    """SD v1 and 2.x: prompts -> the text encoder's last hidden states [B, 77, D]."""
    ids = tokenize(tokenizer, prompts, warned).to(text_encoder.device)
    return text_encoder(ids).last_hidden_state


@torch.no_grad()
def encode_xl(tokenizers, text_encoders, prompts, size, warned):
    """SDXL: prompts -> (context [B, 77, 768 + 1280], added [B, 1280 + 6]) for an image of `size`
    (height, width).

    context: the penultimate hidden states of CLIP ViT-L and of OpenCLIP bigG, side by side,
    neither through its final layer norm (sgm's FrozenCLIPEmbedder layer "hidden", layer_idx 11;
    FrozenOpenCLIPEmbedder2 "penultimate", legacy False); added: bigG's pooled embedding (its last
    block's EOS token, final layer norm, projection), then the six size numbers, original size
    (h, w), crop (top, left), target size (h, w), the image's size uncropped.

    The empty prompt is all zeros but for the size numbers: SDXL base learned "no caption" as zero
    embeddings (sgm's conditioner drops captions by zeroing them), as diffusers' pipeline
    (force_zeros_for_empty_prompt) zeros the negative context and pooled embedding when no
    negative prompt is given; it encodes an explicit "" as text."""
    states = [
        encoder(tokenize(tokenizer, prompts, warned).to(encoder.device), output_hidden_states=True)
        for tokenizer, encoder in zip(tokenizers, text_encoders)
    ]
    context = torch.cat([s.hidden_states[-2] for s in states], dim=-1)  # [B, 77, 768 + 1280]
    pooled = states[-1].text_embeds  # CLIPTextModelWithProjection's projected EOS token

    # the size numbers, the same for every prompt
    numbers = torch.tensor([*size, *CROP, *size], dtype=pooled.dtype, device=pooled.device)
    numbers = numbers.expand(len(prompts), -1)

    # the empty prompt: zeros
    empty = torch.tensor([prompt == "" for prompt in prompts], device=context.device)[:, None]
    context = context.masked_fill(empty[:, :, None], 0)
    added = torch.cat([pooled.masked_fill(empty, 0), numbers], dim=-1)
    return context, added
