"""The one factory of tiny random models and tokenizers for the suite (nothing is downloaded).

    from factory import tiny_llama, tiny_gpt2, tiny_tokenizer, save_tiny_llama
    model = tiny_llama()            # seeded: the same weights on every call
    tok = tiny_tokenizer()          # cached; treat it as read-only

Models are 2 layers, hidden 64 by default, in eval mode; ``tiny_llama(vocab=...)`` sizes the
embedding (``VOCAB`` for token-id tests, ``len(tiny_tokenizer())`` for text tests).

The tokenizer is a byte-level BPE (every string encodes, no unknown tokens) trained in a few milliseconds on the
demo-task text plus some plain English, with SmolLM2's special tokens at ids 0, 1, 2 and a
SmolLM2-style ChatML ``chat_template``. eos is ``<|im_end|>`` (the end of an assistant turn),
pad is ``<|endoftext|>``.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 128  # embedding size of the token-id models (tiny_llama() / tiny_gpt2())
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 512

# SmolLM2-135M-Instruct's template: a default system prompt, ChatML turns.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ENGLISH = [
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful AI assistant.",
    "Answer the question in one short sentence.",
    "What is the capital of France? Paris is the capital of France.",
    "Translate to French: good morning. Bonjour.",
    "Write a haiku about the sea and the wind in the evening.",
    "Low-rank adaptation trains two small matrices instead of the full weight.",
    "Summarise the text below, then list three key points.",
]


def _corpus() -> list[str]:
    from loraforge.demo.tasks import TASKS, make_examples

    lines = list(ENGLISH)
    for task in TASKS:
        for row in make_examples(150, seed=123, task=task):
            lines += [m["content"] for m in row["messages"]]
    return lines


@functools.lru_cache(maxsize=None)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The shared test tokenizer (about 512 tokens); the same ids on every build."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_llama(seed: int = 0, hidden: int = 64, vocab: int = VOCAB, context: int = 64, tied: bool = False,
               attn: str | None = None, text: bool = False) -> LlamaForCausalLM:
    """A seeded random 2-layer Llama (4 heads, 2 KV heads, MLP 2 x hidden) in eval mode.

    ``text=True`` sizes it for the tiny tokenizer and sets its eos / pad ids (``vocab`` ignored)."""
    torch.manual_seed(seed)
    ids = {}
    if text:
        tok = tiny_tokenizer()
        vocab, ids = len(tok), {"bos_token_id": None, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=2 * hidden, vocab_size=vocab, max_position_embeddings=context,
                         tie_word_embeddings=tied, **ids, **({"attn_implementation": attn} if attn else {}))
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A seeded random 2-layer GPT-2 (Conv1D layers, tied head) in eval mode."""
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def save_tiny_llama(out: Path, seed: int = 0, tied: bool = True, context: int = 512, **kwargs) -> Path:
    """``tiny_llama(text=True)`` + the tiny tokenizer saved as a model directory."""
    tiny_llama(seed, context=context, tied=tied, text=True, **kwargs).save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


def randomize_adapters(model: torch.nn.Module, seed: int = 1, std: float = 0.2) -> torch.nn.Module:
    """Give every adapter a non-zero update: random lora_B / embedding factors, a DoRA magnitude
    perturbed away from the row norms, noise on modules_to_save copies. Works on loraforge and
    on PEFT models (whose embedding init zeroes lora_embedding_A instead of B)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "modules_to_save." in name:  # the per-adapter copy, never the original
                p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# --- the architecture matrix -----------------------------------------------------------------------
WINDOW = 8  # sliding window of the windowed models: shorter than the test rows
_DECODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128)
_MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)
ARCHITECTURES = {  # name: (config class, config kwargs, model class)
    "llama": ("LlamaConfig", {}, "LlamaForCausalLM"),
    "mistral": ("MistralConfig", {"sliding_window": WINDOW}, "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", {}, "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", {"head_dim": 16}, "Qwen3ForCausalLM"),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": WINDOW, "attn_implementation": "eager"},
               "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": WINDOW}, "Gemma3ForCausalLM"),
    "phi3": ("Phi3Config", {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}, "Phi3ForCausalLM"),
    "gpt2": ("GPT2Config", None, "GPT2LMHeadModel"),
    "gpt_neox": ("GPTNeoXConfig", {}, "GPTNeoXForCausalLM"),
    "opt": ("OPTConfig", None, "OPTForCausalLM"),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}, "MixtralForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, **_MOE, "shared_expert_intermediate_size": 64},
                  "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", {"head_dim": 16, "num_experts": 4, **_MOE}, "Qwen3MoeForCausalLM"),
}
_OWN_KWARGS = {  # the architectures whose config names differ from the Llama family's
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128, bos_token_id=0, eos_token_id=0),
    "opt": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, vocab_size=VOCAB,
                max_position_embeddings=128, word_embed_proj_dim=64, bos_token_id=0, eos_token_id=2, pad_token_id=1),
}


def tiny_arch(name: str, seed: int = 0) -> torch.nn.Module:
    """A seeded random 2-layer model (hidden 64) of one of ARCHITECTURES, in eval mode."""
    config_cls, extra, model_cls = ARCHITECTURES[name]
    kwargs = _OWN_KWARGS[name] if extra is None else {**_DECODER, **extra}
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**kwargs)
    return getattr(transformers, model_cls)(config).eval()


def lm_steps(model: torch.nn.Module, ids: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    """`steps` AdamW steps of next-token loss on `ids` over the trainable parameters; the losses."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses
