"""Helpers shared by the test modules: adapters with non-trivial values, and driving the ``qpeft`` CLI."""

from __future__ import annotations

from pathlib import Path

import click
import torch
from click.testing import CliRunner, Result
from torch import nn

from qpeft_deploy.core.attach import adapted_layers, attach
from qpeft_deploy.io.model_io import save_adapter
from qpeft_deploy.models import SMOLLM2, load_causal_lm, load_task_model


def randomize(model: nn.Module, seed: int = 1, scale: float = 0.3) -> nn.Module:
    """Give λ and the head non-trivial values (λ starts at 0, which would make every check vacuous)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("spectrum.lam") or name.startswith("classifier."):
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return model


def make_adapter(path: Path, labels: dict[int, str], seed: int, **options) -> Path:
    """A saved MiniLM adapter with random λ, Taylor parameters and head, so adapters compute different things."""
    model = attach(load_task_model("minilm", labels, seed=seed), seed=seed, **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.spectrum.lam.copy_(torch.randn(layer.rank, generator=g) * 0.5)
            for name, p in layer.named_parameters():
                if name.endswith(".b"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for p in model.classifier.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return save_adapter(model, path, base="minilm")


def run(command: click.Command, *args) -> Result:
    """Invoke a click command (the ``qpeft`` group) in-process with string arguments."""
    return CliRunner().invoke(command, [str(a) for a in args])


def assert_one_line_error(result: Result, *words: str) -> None:
    """Exit code 2 and exactly one ``qpeft: error:`` line on stderr that contains every word."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qpeft: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def tiny_gpt2_folder(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer GPT-2 LM (Conv1D layers, tied embeddings) saved as an HF folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=100, n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def causal_adapter_model(seed: int, scale: float = 1.0, **options) -> nn.Module:
    """SmolLM2 with an all-linear K=8 adapter (lm_head not a target; ``options`` for attach change that) of
    random angles and λ, so that its generations differ from the base's and from other seeds'."""
    model = attach(load_causal_lm(SMOLLM2), **({"rank": 8} | options), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            for name, p in layer.named_parameters():
                if name.endswith("spectrum.lam"):
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
                elif name.startswith(("u.", "v.")):
                    p.copy_(torch.randn(p.shape, generator=g))
    return model.eval().requires_grad_(False)


def make_causal_adapter(path: Path, seed: int, scale: float = 1.0, **options) -> Path:
    """:func:`causal_adapter_model` saved (with SmolLM2's fingerprint) at ``path``."""
    return save_adapter(causal_adapter_model(seed, scale, **options), path, base=SMOLLM2)


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    """(1, T) token ids of ``prompt`` as one user turn of the tokenizer's chat template, ready to answer."""
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=False
    )


def greedy(model: nn.Module, ids: torch.Tensor, tokens: int = 32) -> list[int]:
    """The new token ids of transformers' own greedy ``generate`` on one unpadded row."""
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def char_tokenizer():
    """A character-level fast tokenizer: <pad> (0), <unk> (1), then printable ASCII (97 ids; no template, no
    end-of-sequence token)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1} | {chr(c): c - 30 for c in range(32, 127)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def tiny_llama_folder(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama LM (GQA: 4 heads, 2 key/value heads; tied embeddings; no end-of-sequence token,
    so greedy generation always runs its full length) with :func:`char_tokenizer`, saved as an HF folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        initializer_range=0.1,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def tiny_llama_adapter(base: Path, path: Path, seed: int, **options) -> nn.Module:
    """The tiny Llama at ``base`` with an all-linear adapter (rank 4 unless ``options`` say otherwise) of random
    angles and λ, saved at ``path``; returns the adapted model (eval, for reference outputs)."""
    from transformers import LlamaForCausalLM

    model = attach(LlamaForCausalLM.from_pretrained(base).eval(), **({"rank": 4} | options), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            for name, p in layer.named_parameters():
                if name.endswith("spectrum.lam") or name.startswith(("u.", "v.")):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    save_adapter(model, path, base=str(base))
    return model.eval().requires_grad_(False)
