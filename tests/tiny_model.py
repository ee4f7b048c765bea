"""A tiny causal LM with RANDOM weights, built from a config at test time.

It is not a trained model and claims nothing about quality: it exists so that the
training, saving and reloading code runs end to end without any download. Its
tokenizer is a small byte-level BPE trained on the shipped real sample text.

With tied embeddings (the default) greedy decoding repeats the prompt's last token (a newline), so
every output decodes to ""; ``tie_embeddings=False`` gives outputs made of words, for tests
that compare generated texts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cbpo_orch.home import SAMPLE_DATA

LABEL = "tiny-random-llama (random weights, built from a config for tests)"


def _corpus() -> list[str]:
    questions = json.loads((SAMPLE_DATA / "dev_questions.json").read_text())
    return [f"{p['text']} {p['title']}" for q in questions for p in q["profile"]] + [q["input"] for q in questions]


def build_tiny_model(out: Path, seed: int = 0, tie_embeddings: bool = True) -> Path:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_corpus(), vocab_size=600, special_tokens=["<|endoftext|>", "<|pad|>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", pad_token="<|pad|>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_embeddings,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "MODEL_CARD.md").write_text(f"# {LABEL}\n")
    return out
