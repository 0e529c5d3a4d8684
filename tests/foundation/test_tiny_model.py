"""The offline tiny base model loads with transformers' Auto classes and is reproducible."""

from __future__ import annotations

import subprocess
import sys

import torch
from safetensors.torch import load_file

from workers.tiny_model import make_tiny_model


def test_tiny_model_loads_offline_with_auto_classes(tiny_model_dir):
    # A fresh interpreter with the hub switched off proves nothing is fetched.
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = t('hello world', return_tensors='pt').input_ids\n"
        "out = m(ids).logits\n"
        "assert out.shape == (1, ids.shape[1], m.config.vocab_size), out.shape\n"
        "c = m.config\n"
        "assert c.model_type == 'llama' and c.num_key_value_heads < c.num_attention_heads\n"
        "print('ok')\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code, str(tiny_model_dir)], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_chat_template_round_trips(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Reverse: one two three"},
        {"role": "assistant", "content": "three two one"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    assert tokenizer.decode(ids["input_ids"]) == text
    for message in messages:
        assert message["content"] in text
    # The assistant mask covers exactly the assistant's answer and its end-of-turn token.
    masked = [t for t, m in zip(ids["input_ids"], ids["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(masked) == "three two one" + tokenizer.eos_token
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt)


def test_same_seed_gives_identical_weights(tmp_path):
    a = load_file(make_tiny_model(tmp_path / "a", seed=7) / "model.safetensors")
    b = load_file(make_tiny_model(tmp_path / "b", seed=7) / "model.safetensors")
    c = load_file(make_tiny_model(tmp_path / "c", seed=8) / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    tokenizer_a, tokenizer_b = (tmp_path / d / "tokenizer.json" for d in "ab")
    assert tokenizer_a.read_bytes() == tokenizer_b.read_bytes()
