"""The prompt side of Qwen-Image-Edit-2509: the LR image inside the Qwen2.5-VL text encoder.

``model.condition=edit`` (production default) conditions the transformer the way Qwen-Image-Edit-2509
was trained (diffusers' ``QwenImageEditPlusPipeline._get_qwen_prompt_embeds``; facts in
``docs/upstream_notes.md`` section 3): the user turn is ``"Picture 1: <|vision_start|><|image_pad|>
<|vision_end|>" + instruction`` inside the Edit-Plus system template, the image resized to a 384x384
area (sides multiples of 32, aspect kept; Lanczos, as diffusers' image processor resizes), the
``<|image_pad|>`` token expanded to the image's merged patch count, the last hidden state of the
Qwen2.5-VL forward taken and its first 64 positions (the system part) dropped. The VAE reference
latents travel on the sequence axis as before (:class:`~oars_fast.models.backbone.SRBackbone`).

The project assembles the tokens itself (tokenizer + ``Qwen2VLImageProcessor`` + the model's special
tokens) instead of using ``Qwen2VLProcessor``, which cannot be built without its files and a video
processor; for one image per prompt the result is the same token sequence.

``model.condition=text`` keeps one text-only prompt embedding for every input (the tiny demo).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from ..errors import MissingFileError

EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
EDIT_DROP_TOKENS = 64  # the system part of the template: hidden states dropped
IMAGE_PROMPT = "Picture 1: <|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
CONDITION_AREA = 384 * 384
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", IMAGE_PAD,
                  "<|video_pad|>"]


def _image_processor_class():
    """Qwen2-VL's image processor: the PIL-backed class where transformers has one (the default class
    wants torchvision, which this project does not depend on), else the default class."""
    import transformers  # heavy: only when edit conditioning is used

    return getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor


def condition_size(width: int, height: int, area: int = CONDITION_AREA) -> tuple[int, int]:
    """(w, h) of the VL encoder's image: `area` pixels at the input's aspect, sides rounded to 32."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    return max(32, round(w / 32) * 32), max(32, round(h / 32) * 32)


class EditPromptEncoder(nn.Module):
    """LR images -> per-image prompt embeddings (B, L, D) and masks (B, L), for one instruction.

    Images of one call must share a size (one batched forward; the crops of a batch do)."""

    def __init__(self, text_encoder: nn.Module, tokenizer, image_processor, source: str | None = None):
        super().__init__()
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.source = source  # where the weights came from (a saved model folder refers to it)
        self.merge = getattr(image_processor, "merge_size", 2)

    @property
    def hidden_size(self) -> int:
        cfg = self.text_encoder.config
        return getattr(cfg, "text_config", cfg).hidden_size

    def _images(self, lr: torch.Tensor) -> list[np.ndarray]:
        w, h = condition_size(lr.shape[-1], lr.shape[-2])
        arr = (lr.detach().float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return [np.asarray(Image.fromarray(a).resize((w, h), Image.LANCZOS)) for a in arr]

    @torch.no_grad()
    def forward(self, lr: torch.Tensor, instruction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`lr` (B, 3, h, w) in [0, 1] -> (embeds (B, L, D) float32, mask (B, L) long) on lr's device."""
        device = next(self.text_encoder.parameters()).device
        vis = self.image_processor(images=self._images(lr), return_tensors="pt")
        grid = vis["image_grid_thw"]
        n_pad = int(grid[0].prod()) // self.merge**2
        if not bool((grid == grid[0]).all()):
            raise ValueError("EditPromptEncoder: the images of one call must share a size")
        text = EDIT_TEMPLATE.format(IMAGE_PROMPT.replace(IMAGE_PAD, IMAGE_PAD * n_pad) + instruction)
        ids = self.tokenizer([text] * lr.shape[0], return_tensors="pt")
        dtype = next(self.text_encoder.parameters()).dtype
        out = self.text_encoder(input_ids=ids["input_ids"].to(device), attention_mask=ids["attention_mask"].to(device),
                                pixel_values=vis["pixel_values"].to(device, dtype), image_grid_thw=grid.to(device),
                                output_hidden_states=True)
        hidden = out.hidden_states[-1][:, EDIT_DROP_TOKENS:]
        mask = ids["attention_mask"][:, EDIT_DROP_TOKENS:]
        return hidden.float().to(lr.device), mask.long().to(lr.device)

    # -- persistence (the hub layout: text_encoder/, tokenizer/, processor/) --------------------------
    def save_pretrained(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.text_encoder.save_pretrained(folder / "text_encoder")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.image_processor.save_pretrained(folder / "processor")

    @classmethod
    def from_pretrained(cls, src: str, dtype: torch.dtype = torch.float32) -> EditPromptEncoder:
        """Text encoder, tokenizer and image processor of a checkpoint (folder or hub id)."""
        # transformers' VL model classes are heavy: imported only when edit conditioning is used
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        try:
            te = Qwen2_5_VLForConditionalGeneration.from_pretrained(src, subfolder="text_encoder", dtype=dtype)
            tok = AutoTokenizer.from_pretrained(src, subfolder="tokenizer")
            ip = _image_processor_class().from_pretrained(src, subfolder="processor")
        except OSError as e:
            raise MissingFileError(
                f"model.condition=edit needs the Qwen2.5-VL text encoder of {src}: {str(e).splitlines()[0]} Expected "
                f"{src}/text_encoder/, tokenizer/ and processor/ (the Qwen-Image-Edit-2509 layout: huggingface-cli "
                f"download Qwen/Qwen-Image-Edit-2509), or model.condition=text with a stored prompt embedding.") \
                from None
        return cls(te, tok, ip, source=src)


def tiny_edit_encoder(hidden_size: int, seed: int = 0) -> EditPromptEncoder:
    """A random-weight Qwen2.5-VL text encoder of the production class with a tokenizer built offline (byte-level
    BPE over the template's text plus the model's special tokens): for tests and the tiny model."""
    # transformers' VL classes and the tokenizers trainer are heavy: imported only when a tiny encoder is built
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([EDIT_TEMPLATE, IMAGE_PROMPT, "Restore this low-resolution photo into a sharp, detailed "
                             "high-resolution photo."], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=SPECIAL_TOKENS[1:])
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    heads = 2
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=1,
                         max_position_embeddings=4096, bos_token_id=ids["<|endoftext|>"],
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         rope_scaling={"type": "mrope", "mrope_section": _mrope(hidden_size // heads)}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden_size,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0],
                           window_size=112),
        image_token_id=ids[IMAGE_PAD], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    te = Qwen2_5_VLForConditionalGeneration(cfg)
    return EditPromptEncoder(te, tok, _image_processor_class()())


def _mrope(head_dim: int) -> list[int]:
    """Qwen2.5-VL's (temporal, height, width) rotary sections for a head dim: half the dim in the ratio 2:3:3."""
    half = head_dim // 2
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]


def encode_text_prompt(pretrained: str, prompt: str, device: torch.device):
    """One text-only prompt embedding (``model.condition=text``) with the checkpoint's text encoder through
    diffusers' text-to-image pipeline (its template, no image); (embeds (1, L, D), mask (1, L))."""
    from diffusers import QwenImagePipeline  # heavy (transformers' Qwen2.5-VL): only when a prompt is embedded

    try:
        pipe = QwenImagePipeline.from_pretrained(pretrained, transformer=None, vae=None, torch_dtype=torch.bfloat16)
    except (OSError, ValueError) as e:
        raise MissingFileError(
            f"cannot load the text encoder of {pretrained} to embed the SR prompt ({str(e).splitlines()[0]}). Place "
            f"the checkpoint with its text_encoder/ and tokenizer/ folders there (huggingface-cli download "
            f"{pretrained}), or give model.prompt_embeds=<file with prompt_embeds/prompt_mask tensors>.") from None
    pipe.text_encoder.to(device)
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(prompt=[prompt], device=device)
    del pipe
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    return embeds.float().cpu(), mask.long().cpu()
