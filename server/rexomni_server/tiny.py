"""A tiny random Qwen2.5-VL checkpoint with Rex-Omni's token layout.

The real weights cannot be downloaded everywhere (CI, air-gapped machines), so tests, the
offline quickstart and the CPU benchmarks use a checkpoint this module generates: the same
architecture class, chat template, special tokens and ``<0>``..``<999>`` coordinate tokens
as Rex-Omni, with only the sizes shrunk. Its weights are random, so its free-running output
is garbage: tests force the output they need (see ``engines.forced``).

Everything here is deterministic (fixed corpus, fixed seed), so two runs write the same
files and tokenisation in tests is stable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rexomni_server.coords import bin_token
from rexomni_server.tasks import KEYPOINT_SETS, TASKS
from rexomni_server.vocabulary import END_MARKER, NUM_BINS, PIXEL_UNIT

# The special tokens of Qwen2.5-VL in their original order (ids follow the base vocabulary).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
COORDINATE_TOKENS = tuple(bin_token(i) for i in range(NUM_BINS))

# Qwen2-VL's chat template (the one Rex-Omni ships), reduced to the single-image case we use.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_TEXT = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    # head_dim 64: vLLM's CPU attention kernels reject smaller heads.
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    # mrope sections must add up to head_dim / 2.
    "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
    "max_position_embeddings": 32768,
    "hidden_act": "silu",
}
TINY_VISION = {
    "depth": 2,
    "hidden_act": "silu",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_heads": 2,
    "in_chans": 3,
    "out_hidden_size": 128,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "spatial_patch_size": 14,
    "temporal_patch_size": 2,
    "window_size": 112,
    "fullatt_block_indexes": [1],
    "tokens_per_second": 2,
}
BPE_VOCAB_SIZE = 700
SEED = 0


def _training_corpus() -> list[str]:
    """Text the tiny BPE is trained on: our prompts and labels, so they tokenise compactly."""
    lines = [spec.template for spec in TASKS.values()]
    lines += [", ".join(names) for names in KEYPOINT_SETS.values()]
    lines += [
        "person car dog cat bicycle bus truck traffic light chair table bottle cup word",
        "text line button icon search bar menu the a an of in on and with to is are",
        "You are a helpful assistant system user assistant json bbox keypoints unvisible",
        "0123456789 .,:;!?'\"()[]{}-_/\\@#$%^&*+=<>|~` ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    ]
    return lines


def build_tokenizer() -> Any:
    """A deterministic byte-level BPE with Qwen's specials and the coordinate tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.trainers import BpeTrainer
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.NFC()
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer_tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trainer_tok.train_from_iterator(_training_corpus() * 4, trainer=trainer)
    state = json.loads(trainer_tok.to_str())["model"]
    # Pairs, not "a b" strings: the tokenizers backend wants tuples here.
    merges: Any = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=state["vocab"],
        merges=merges,
        eos_token=END_MARKER,
        pad_token="<|endoftext|>",
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    # Coordinates are ordinary (non-special) added tokens, as in the real checkpoint's vocabulary.
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in COORDINATE_TOKENS])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 32768
    return tokenizer


def architecture(vocab_size: int, token_ids: dict[str, int]) -> dict[str, Any]:
    """The flat config dict (same shape as the real checkpoint's config.json)."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        **TINY_TEXT,
        "tie_word_embeddings": True,
        "vocab_size": vocab_size,
        "torch_dtype": "float32",
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids[END_MARKER],
        "pad_token_id": token_ids["<|endoftext|>"],
        "vision_start_token_id": token_ids["<|vision_start|>"],
        "vision_end_token_id": token_ids["<|vision_end|>"],
        "vision_token_id": token_ids["<|vision_pad|>"],
        "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "vision_config": dict(TINY_VISION),
    }


def build_model(config_dict: dict[str, Any], seed: int = SEED, dtype: str = "float32") -> Any:
    """A randomly initialised Qwen2.5-VL of the given flat config (any size, e.g. the 3B one)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    clean = {k: v for k, v in config_dict.items() if not k.startswith("_")}
    config = Qwen2_5_VLConfig(**clean)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    return model.to(getattr(torch, dtype)).eval()


def write_image_processor(directory: Path) -> None:
    """Qwen2-VL image processor settings (Rex-Omni's pixel budget)."""
    config = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
        "min_pixels": 16 * PIXEL_UNIT,
        "max_pixels": 2560 * PIXEL_UNIT,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "processor_class": "Qwen2_5_VLProcessor",
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")


def make_tiny_model(directory: str | Path) -> Path:
    """Write the tiny checkpoint into ``directory`` (created if needed) and return its path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out)
    token_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    # Round up like real checkpoints do (the embedding is padded past the tokenizer).
    vocab_size = (len(tokenizer) + 63) // 64 * 64
    model = build_model(architecture(vocab_size, token_ids))
    model.save_pretrained(out)
    generation = {"bos_token_id": token_ids["<|endoftext|>"], "eos_token_id": token_ids[END_MARKER]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_image_processor(out)
    (out / "README.md").write_text(
        "# Tiny random Rex-Omni-layout checkpoint\n\n"
        "RANDOM WEIGHTS: generated by `rexomni-server make-tiny-model` for tests and offline demos.\n"
        "Its detections are meaningless unless its output is forced.\n"
    )
    (out / "rexomni_tiny.json").write_text(json.dumps({"random_weights": True, "seed": SEED}) + "\n")
    return out


def is_tiny_model(path: str | Path) -> bool:
    """True for a checkpoint written by :func:`make_tiny_model` (random weights)."""
    return (Path(path) / "rexomni_tiny.json").is_file()


def architecture_config(name: str) -> dict[str, Any]:
    """A shipped architecture (``qwen2_5_vl_3b``: Rex-Omni's exact sizes) as a flat config dict."""
    from importlib.resources import files

    text = files("rexomni_server").joinpath("configs", f"{name}.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def random_components(arch: dict[str, Any], device: str, dtype: str) -> tuple[Any, Any, Any]:
    """(model, tokenizer, image processor) for random weights of any architecture's sizes.

    The tokenizer is the tiny one; the architecture keeps its own vocabulary size (the LM head
    is part of every decode step's cost) with the special-token ids remapped to the tokenizer's.
    Decode cost does not depend on the weights' values, so this times the real model's work.
    """
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    remap = architecture(arch.get("vocab_size", len(tokenizer)), ids)
    config_dict = {**arch, **{k: v for k, v in remap.items() if k.endswith("_token_id")}}
    config_dict["torch_dtype"] = dtype
    config = Qwen2_5_VLConfig(**config_dict)
    torch.manual_seed(SEED)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=getattr(torch, dtype))
    image_processor = Qwen2VLImageProcessor(min_pixels=16 * PIXEL_UNIT, max_pixels=2560 * PIXEL_UNIT)
    return model.eval(), tokenizer, image_processor
