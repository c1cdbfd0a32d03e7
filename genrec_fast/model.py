"""Model and tokenizer: any HF causal LM (by name or path) or the ``tiny`` preset, with SID tokens.

SID tokens (``<a_0>`` ... per level, ``genrec_fast.sid_tokens``) are added as ONE contiguous
block of token ids in block order; this is checked, the embeddings are resized, and the
block is described by a :class:`genrec_fast.sid_tokens.SIDVocab`. ``tiny`` builds a small Qwen2
from scratch with a byte-level BPE tokenizer trained (deterministically, offline) on the
catalogue titles and the prompt template, for CPU runs and tests.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from genrec_fast.sid_tokens import SIDVocab, sid_token_strings

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
# the tiny preset's shape; override any field with ``model_overrides``
TINY_CONFIG: Dict[str, int] = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=384,
    max_position_embeddings=2048,
)
TINY_VOCAB_SIZE = 3000


def build_tiny_tokenizer(corpus: Iterable[str], vocab_size: int = TINY_VOCAB_SIZE):
    """A byte-level BPE tokenizer trained on ``corpus`` (same corpus -> same tokenizer), with pad/eos."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def _sid_block_start(tokenizer, strings: List[str]) -> Optional[int]:
    """Start id of the SID block if all strings are already tokens, contiguous and in order; None if none are."""
    ids = tokenizer.convert_tokens_to_ids(strings)
    unk = tokenizer.unk_token_id
    present = [i is not None and i != unk for i in ids]
    if not any(present):
        return None
    if not all(present):
        missing = [s for s, p in zip(strings, present) if not p][:5]
        raise ValueError(f"tokenizer has only part of the SID token block (missing e.g. {missing})")
    start = ids[0]
    bad = [k for k, i in enumerate(ids) if i != start + k]
    if bad:
        k = bad[0]
        raise ValueError(
            f"SID tokens are not one contiguous ordered block: {strings[k]} has id {ids[k]}, expected {start + k}"
        )
    return start


def add_sid_tokens(tokenizer, codebook_sizes: Optional[Sequence[int]], model=None,
                   pad_to_multiple_of: Optional[int] = 64):
    """Add the SID token block (if absent), check it is contiguous, resize ``model``'s embeddings; return the SIDVocab.

    ``codebook_sizes`` None: the block must already be in the tokenizer (read off it).
    """
    if codebook_sizes is None:
        return SIDVocab.from_tokenizer(tokenizer)
    strings = sid_token_strings(codebook_sizes)
    start = _sid_block_start(tokenizer, strings)
    if start is None:
        before = len(tokenizer)
        added = tokenizer.add_tokens(strings)
        if added != len(strings):
            raise ValueError(f"added {added} of {len(strings)} SID tokens; some already exist as tokens")
        start = _sid_block_start(tokenizer, strings)
        if start != before:
            raise ValueError(f"SID block starts at {start}, expected right after the vocabulary ({before})")
    if model is not None:
        emb = model.get_input_embeddings().weight.shape[0]
        if emb < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to_multiple_of)
    vocab = SIDVocab.from_tokenizer(tokenizer, tuple(int(k) for k in codebook_sizes))
    if vocab.start != start:
        raise ValueError(f"SIDVocab start {vocab.start} differs from the block start {start}")
    return vocab


def load_model_and_tokenizer(
    name_or_path: str,
    codebook_sizes: Optional[Sequence[int]] = None,
    *,
    corpus: Optional[Iterable[str]] = None,
    tokenizer_vocab_size: int = TINY_VOCAB_SIZE,
    model_overrides: Optional[dict] = None,
    lora: bool = False,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    device=None,
    torch_dtype=None,
    attn_implementation: Optional[str] = None,
    seed: int = 0,
):
    """Return ``(model, tokenizer, sid_vocab)``.

    ``"tiny"``: a Qwen2 (``TINY_CONFIG`` + ``model_overrides``) made from scratch with ``seed``,
    and a tokenizer trained on ``corpus`` (required). Anything else goes to
    ``AutoModelForCausalLM/AutoTokenizer.from_pretrained`` (a saved run of ours included; its
    SID tokens are found again). ``codebook_sizes`` None reads them off the tokenizer.
    ``lora`` wraps the model with peft LoRA on all linear layers, the SID token rows of the
    embedding trainable too.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    # sdpa unless asked: the packed SFT batches, the beam search and its CUDA graphs are measured and
    # tested on sdpa (a flash-attention model trains packed as one varlen row and decodes on sdpa)
    attn = attn_implementation or "sdpa"
    if name_or_path == "tiny":
        model, tokenizer, vocab = _tiny_model_and_tokenizer(codebook_sizes, corpus, tokenizer_vocab_size,
                                                            model_overrides, attn, torch_dtype, seed)
    else:
        model, tokenizer, vocab = _pretrained_model_and_tokenizer(name_or_path, codebook_sizes, model_overrides,
                                                                  attn, torch_dtype)
    model.to(device)
    if lora:
        model = _with_lora(model, vocab, lora_r, lora_alpha, lora_dropout)
    return model, tokenizer, vocab


def _tiny_model_and_tokenizer(codebook_sizes: Optional[Sequence[int]], corpus: Optional[Iterable[str]],
                              tokenizer_vocab_size: int, model_overrides: Optional[dict], attn: str, torch_dtype,
                              seed: int):
    """The tiny preset: a tokenizer trained on ``corpus`` with the SID block, and a Qwen2 made from scratch
    with ``seed`` (``TINY_CONFIG`` + ``model_overrides``)."""
    if codebook_sizes is None:
        raise ValueError("the tiny preset needs codebook_sizes")
    if corpus is None:
        raise ValueError("the tiny preset needs a corpus to train its tokenizer on")
    tokenizer = build_tiny_tokenizer(corpus, tokenizer_vocab_size)
    vocab = add_sid_tokens(tokenizer, codebook_sizes)
    cfg = dict(TINY_CONFIG)
    cfg.update(model_overrides or {})
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        tie_word_embeddings=cfg.pop("tie_word_embeddings", True),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        use_cache=True,
        **cfg,
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return model, tokenizer, vocab


def _pretrained_model_and_tokenizer(name_or_path: str, codebook_sizes: Optional[Sequence[int]],
                                    model_overrides: Optional[dict], attn: str, torch_dtype):
    """An HF causal LM and its tokenizer (``from_pretrained``; left padding, pad = eos when it has none) with
    the SID block added or found again."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    kw = {"attn_implementation": attn}
    if torch_dtype is not None:
        kw["dtype"] = torch_dtype
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **kw)
    if model_overrides:
        raise ValueError("model_overrides only apply to the tiny preset")
    vocab = add_sid_tokens(tokenizer, codebook_sizes, model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, vocab


def _with_lora(model, vocab: SIDVocab, lora_r: int, lora_alpha: int, lora_dropout: float):
    """``model`` wrapped with peft LoRA on all linear layers, the SID token rows of the embedding (and of an
    untied LM head) trainable too."""
    from peft import LoraConfig, get_peft_model  # lazy: peft is optional (the 'lora' extra)

    sid_ids = list(range(vocab.start, vocab.end))
    # the SID rows must train in the input embedding AND in the LM head: a tied head follows the
    # embedding, an untied one (Qwen2.5 >= 1.5B, Llama, ...) needs its own entry ("all-linear" skips it)
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tokens = {names[id(emb)]: sid_ids}
    if head is not None and head.weight is not emb.weight:
        tokens[names[id(head)]] = sid_ids
    return get_peft_model(model, LoraConfig(
        r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules="all-linear",
        task_type="CAUSAL_LM", trainable_token_indices=tokens,
    ))


_POSITION_CONFIG = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def max_positions(model) -> Optional[int]:
    """The most token positions the model was built for (``config.max_position_embeddings`` or its other
    names; through a PEFT wrapper too), None when its config gives none."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    for attr in _POSITION_CONFIG:
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def encode_prompts(tokenizer, texts: Sequence[str], max_length: Optional[int] = None):
    """Tokenize prompts (no special tokens) and LEFT pad them; over-long prompts keep their last tokens.

    Returns ``(input_ids, attention_mask)`` LongTensors [batch, T].
    """
    if len(texts) == 0:
        raise ValueError("encode_prompts: no texts")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token")
    rows = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    empty = [i for i, r in enumerate(rows) if not r]
    if empty:
        raise ValueError(f"encode_prompts: prompt(s) {empty[:5]} tokenize to nothing (a search or a response "
                         "needs at least one prompt token)")
    if max_length is not None:
        if max_length < 1:
            raise ValueError(f"encode_prompts: max_length must be >= 1, got {max_length}")
        rows = [r[-max_length:] for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """``model.eval()`` for the block, then every submodule's own train / eval flag back as it was
    (``model.train(flag)`` would give them all the top module's flag, e.g. a frozen eval-mode tower
    would come back in train mode)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        model.train(modes[0][1])  # through the model's own train() (it may do more than set flags)
        for m, flag in modes:
            m.training = flag


_RESCALED_LOGITS_CONFIG = ("final_logit_softcapping", "logit_scale", "logits_scaling")  # Gemma2/3, Cohere, Granite


def join_prompt_response(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append ``response_ids`` [R, L] to left-padded prompts [R, P].

    Returns (input_ids, attention_mask, position_ids) [R, P+L]; positions count real tokens
    only (as HF generate does for left padding), so a prompt's logits do not depend on its padding.
    """
    if prompt_ids.dim() != 2 or response_ids.dim() != 2:
        raise ValueError(
            f"prompt_ids and response_ids must be 2-D, got {tuple(prompt_ids.shape)} and {tuple(response_ids.shape)}"
        )
    if prompt_ids.shape != prompt_mask.shape:
        raise ValueError(f"prompt_mask shape {tuple(prompt_mask.shape)} != prompt_ids shape {tuple(prompt_ids.shape)}")
    if prompt_ids.shape[0] != response_ids.shape[0]:
        raise ValueError(f"{prompt_ids.shape[0]} prompts but {response_ids.shape[0]} responses")
    if bool((prompt_mask[:, -1] == 0).any()):
        rows = torch.nonzero(prompt_mask[:, -1] == 0).flatten().tolist()
        raise ValueError(f"prompts must be LEFT padded; rows {rows[:10]} end in padding")
    input_ids = torch.cat([prompt_ids, response_ids.to(prompt_ids)], dim=1)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(response_ids, dtype=prompt_mask.dtype)], dim=1)
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids


def sequence_logprobs(
    model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor
) -> torch.Tensor:
    """Sum over the response tokens of log p(token | prompt, previous tokens): [R] float32."""
    return token_logprobs(model, prompt_ids, prompt_mask, response_ids).sum(dim=1)


def token_logprobs(
    model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor
) -> torch.Tensor:
    """log p(token | prompt, previous tokens) of each response token: [R, L] float32.

    Gradients flow to ``model`` unless called under ``torch.no_grad()``. Only the L+1 last
    positions' logits are computed (``logits_to_keep``), in float32 for the log-sum-exp.
    """
    input_ids, attention_mask, position_ids = join_prompt_response(prompt_ids, prompt_mask, response_ids)
    num_resp = response_ids.shape[1]
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        logits_to_keep=num_resp + 1,
    )
    logits = out.logits[:, -(num_resp + 1) : -1].float()  # positions predicting the response tokens
    targets = response_ids.to(logits.device).long().unsqueeze(-1)
    return logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@functools.lru_cache(maxsize=None)
def cache_arg(model_class: type) -> str:
    """The name of an HF model class's cache argument and output: transformers 5.2x names it ``cache``, earlier
    releases ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _cache_kwarg(model: torch.nn.Module) -> str:
    """:func:`cache_arg` of the HF model under DDP / DeepSpeed / PEFT wrappers."""
    while True:
        if hasattr(model, "get_base_model"):  # peft.PeftModel
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP, DeepSpeed engine
            model = model.module
        else:
            break
    return cache_arg(type(model))


def grouped_token_logprobs(
    model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor
) -> torch.Tensor:
    """:func:`token_logprobs` of C responses per prompt, each prompt computed once: [P, C, L] float32.

    prompt_ids / prompt_mask: [P, T] LEFT-padded prompts; response_ids: [P, C, L], C responses of each prompt (a
    GRPO group's beams, an S-DPO sample's chosen + negatives). The prompts run once (with their K/V cache), the
    cache is repeated for the C responses (``repeat_interleave``: gradients from every response flow back into the
    one prompt pass), then the responses' first L - 1 tokens run on it. What ``token_logprobs`` gives on each prompt
    repeated C times, up to float rounding (the same positions, masks and float32 log-sum-exp), in (T + C·L)/(C·(T +
    L)) of its tokens. Gradients flow to ``model`` unless called under ``torch.no_grad()``.
    """
    if response_ids.dim() != 3 or response_ids.shape[0] != prompt_ids.shape[0] or 0 in response_ids.shape:
        raise ValueError(f"grouped_token_logprobs: response_ids must be [P={prompt_ids.shape[0]}, C, L] with "
                         f"C, L >= 1, got {tuple(response_ids.shape)}")
    P, C, L = response_ids.shape
    _, _, positions = join_prompt_response(prompt_ids, prompt_mask, response_ids[:, 0])  # the prompt checks
    T = prompt_ids.shape[1]
    name = _cache_kwarg(model)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions[:, :T], use_cache=True,
                logits_to_keep=1)
    responses = response_ids.to(out.logits.device).long()
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [P, V]: every response's first token
    lp = [first.gather(1, responses[:, :, 0])[..., None]]  # [P, C, 1]
    if L > 1:
        cache = getattr(out, name)
        cache.batch_repeat_interleave(C)
        inputs = responses[:, :, :-1].reshape(P * C, L - 1)
        mask = torch.cat([prompt_mask.repeat_interleave(C, dim=0), prompt_mask.new_ones((P * C, L - 1))], dim=1)
        pos = positions[:, T:T + L - 1].repeat_interleave(C, dim=0)
        logits = model(input_ids=inputs, attention_mask=mask, position_ids=pos, use_cache=True,
                       logits_to_keep=L - 1, **{name: cache}).logits.float()  # [P*C, L-1, V]
        targets = responses[:, :, 1:].reshape(P * C, L - 1, 1)
        rest = logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        lp.append(rest.view(P, C, L - 1))
    return torch.cat(lp, dim=2)


def grouped_sequence_logprobs(
    model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor
) -> torch.Tensor:
    """:func:`sequence_logprobs` of C responses per prompt [P, C, L], each prompt computed once: [P, C] float32."""
    return grouped_token_logprobs(model, prompt_ids, prompt_mask, response_ids).sum(dim=2)


def lm_modules(model):
    """(base transformer, LM-head module) of an HF causal LM, PEFT wrappers unwrapped.

    The callers (beam search, the response-only SFT loss) run the base transformer and apply the
    head to chosen rows themselves, so models whose logits are rescaled after the head are refused.
    """
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    for attr in _RESCALED_LOGITS_CONFIG:
        value = getattr(model.config, attr, None)
        if value not in (None, 1.0):
            raise ValueError(f"models whose logits are rescaled ({attr}={value}) are not supported")
    base = model.base_model
    if base is model:
        raise ValueError(f"{type(model).__name__} has no separate base transformer (model.base_model)")
    return base, model.get_output_embeddings()


# modules whose outputs training dropout acts on: the token embeddings, and each block's attention and MLP
# outputs before the residual add (names of the Llama / Qwen / Mistral family of HF causal LMs)
DROPOUT_MODULES = ("embed_tokens", "o_proj", "down_proj")


def add_train_dropout(model: torch.nn.Module, p: float) -> int:
    """Train-mode dropout with rate ``p`` on the token embeddings and on every attention and MLP output before
    the residual add (GPT-2's embd / resid dropout), for an HF causal LM of the Llama / Qwen family
    (PEFT-wrapped or not). Not on the attention weights: that takes sdpa off its fused kernel (on CPU
    it tripled the tiny preset's training step, 0.37 -> 1.1 s for 8 x 512 tokens; these hooks add 15 %).

    Forward hooks, so nothing of it is saved with the model: a reloaded model has no dropout, and
    ``model.config`` is not changed. In eval mode the hooks return their input. Returns how many module
    outputs get dropout; p = 0 adds nothing. A model with none of ``DROPOUT_MODULES`` is refused.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    if p == 0.0:
        return 0

    def hook(module, inputs, output):
        return torch.nn.functional.dropout(output, p, module.training)

    hooked = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in DROPOUT_MODULES:
            module.register_forward_hook(hook)
            hooked += 1
    if not hooked:
        raise ValueError(f"dropout: {type(model).__name__} has no module named {' / '.join(DROPOUT_MODULES)} "
                         "to add dropout to (Llama / Qwen-style names are supported)")
    return hooked


# attention modules whose keys DropKey masks (Llama / Qwen / Mistral family)
ATTENTION_MODULES = ("self_attn",)


def key_dropout_mask(mask: Optional[torch.Tensor], batch: int, heads: int, length: int, p: float,
                     device) -> torch.Tensor:
    """The attention mask with each (query, key) pair of each head masked out with probability ``p``.

    mask: the layer's mask (bool, True = attend; or additive float, [B or 1, 1 or heads, T, T]), or None for
    plain causal attention. A query always keeps its own key, so no row is masked out entirely.
    """
    keep = torch.rand(batch, heads, length, length, device=device) >= p
    keep |= torch.eye(length, dtype=torch.bool, device=device)
    if mask is None:
        return keep & torch.ones(length, length, dtype=torch.bool, device=device).tril()
    if mask.shape[-2:] != (length, length):
        raise ValueError(f"key dropout: attention mask of shape {tuple(mask.shape)} for {length} tokens "
                         "(training with a KV cache is not supported)")
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, torch.finfo(mask.dtype).min)


def add_key_dropout(model: torch.nn.Module, p: float) -> int:
    """DropKey in train mode: before the softmax, each attention key is masked out with probability ``p``,
    independently per head and query (the softmax renormalises over the keys left; a query keeps its own
    key). Regularises like dropout on the attention weights, but the mask goes to sdpa as an attention mask,
    so sdpa keeps its fused kernel (dropout_p > 0 takes it to the math kernel on CPU).

    Forward pre-hooks on the ``ATTENTION_MODULES`` (the layer's ``attention_mask`` keyword is replaced in
    train mode; eval mode is untouched), so nothing is saved with the model. sdpa or eager attention only.
    Returns the number of attention modules hooked; p = 0 adds nothing; a model without such modules is
    refused.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"key dropout must be in [0, 1), got {p}")
    if p == 0.0:
        return 0

    def hook(module, args, kwargs):
        if not module.training:
            return None
        impl = getattr(module.config, "_attn_implementation", None)
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"key dropout needs sdpa or eager attention, the model runs {impl!r}")
        if "attention_mask" not in kwargs:
            raise ValueError(f"key dropout: {type(module).__name__} was called without an attention_mask keyword")
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        batch, length = hidden.shape[:2]
        kwargs["attention_mask"] = key_dropout_mask(kwargs["attention_mask"], batch,
                                                    module.config.num_attention_heads, length, p, hidden.device)
        return args, kwargs

    hooked = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ATTENTION_MODULES:
            module.register_forward_pre_hook(hook, with_kwargs=True)
            hooked += 1
    if not hooked:
        raise ValueError(f"key dropout: {type(model).__name__} has no module named {' / '.join(ATTENTION_MODULES)} "
                         "(Llama / Qwen-style names are supported)")
    return hooked
