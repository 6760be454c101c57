"""Policy, reference and critic models, and the tiny-model factory for the built-in task.

Everything is loaded from local Hugging Face folders (no network at run time) or built
in-process: a character-level tokenizer and a small Qwen2 model, so that tests and the default
``longcot train`` run need no downloads.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import (
        PreTrainedModel,
        PreTrainedTokenizerBase,
        PreTrainedTokenizerFast,
        Qwen2ForCausalLM,
    )

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)

VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_CONFIG = "value_head.json"


class ModelError(ValueError):
    """A model or tokenizer folder that cannot be used; the message names the path."""


# --------------------------------------------------------------------------------------------
# Tokenizer and tiny model
# --------------------------------------------------------------------------------------------


# The pre-tokenizer regex of Qwen2's tokenizer (transformers' tokenization_qwen2.py).
_QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def build_char_tokenizer(
    charset: str, save_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per character of ``charset`` plus ``<pad>`` (id 0), ``<eos>``
    (id 1) and ``<unk>`` (id 2). Returns a ``transformers.PreTrainedTokenizerFast``.

    Encoding adds no special tokens, and decoding returns the exact text. ``charset`` must be
    ASCII. Characters outside it are dropped when encoding (see below for why not ``<unk>``).

    Why byte-level BPE without merges rather than WordLevel: transformers 5 ignores the saved
    tokenizer class for folders whose config says ``model_type: qwen2`` and rebuilds the
    tokenizer as ``Qwen2Tokenizer`` (byte-level BPE, NFC, Qwen's split regex, no unk token)
    from the saved vocab and merges. A WordLevel vocabulary keyed by raw characters would then
    lose spaces and newlines (byte-level names them "Ġ", "Ċ"). Building exactly that pipeline
    here makes the in-process tokenizer, a reload of the model folder, a reload of a bare
    tokenizer folder and vLLM's loader agree token for token. The rebuilt BPE has no unk
    token, so unknown characters are dropped there; they are dropped here too, to match.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(charset, str) or not charset:
        raise ValueError(f"build_char_tokenizer: charset must be a non-empty string, got {charset!r}")
    if not charset.isascii():
        bad = sorted({ch for ch in charset if not ch.isascii()})
        raise ValueError(f"build_char_tokenizer: charset must be ASCII (one byte per character), got {bad}")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    # Sorted so that the ids do not depend on the order in which the caller listed characters.
    for ch in sorted(set(charset)):
        ((symbol, _),) = byte_level.pre_tokenize_str(ch)
        vocab[symbol] = len(vocab)
    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[],
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            byte_level,
        ]
    )
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        # The default clean-up would rewrite " ." as "." and break the exact round trip.
        clean_up_tokenization_spaces=False,
    )
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def build_tiny_model(
    tokenizer: Any,
    layers: int = 4,
    hidden: int = 128,
    heads: int = 2,
    intermediate: int | None = None,
    max_positions: int = 512,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """A small ``transformers.Qwen2ForCausalLM`` over ``tokenizer``'s vocabulary.

    head_dim = hidden / heads (64 at the defaults: vLLM's CPU attention rejects 16), tied input
    and output embeddings, MLP width ``intermediate`` (default 4 * hidden), and weights that
    depend only on ``seed`` (the global RNG state is left untouched).
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    for name, value in (("layers", layers), ("hidden", hidden), ("heads", heads),
                        ("max_positions", max_positions)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"build_tiny_model: {name} must be a positive int, got {value!r}")
    if hidden % heads:
        raise ValueError(f"build_tiny_model: hidden ({hidden}) must be divisible by heads ({heads})")
    if tokenizer.eos_token_id is None:
        raise ValueError("build_tiny_model: the tokenizer has no eos token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate if intermediate is not None else 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        use_sliding_window=False,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = pad_id
    return model


def _atomic_save(path: str | Path, write) -> Path:
    """Run ``write(tmp_dir)`` and move the folder to ``path``, so that a crash mid-save never
    leaves a half-written checkpoint where a complete one is expected."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        with _no_progress_bars():
            write(tmp)
        _fsync_tree(tmp)  # a rename is only as durable as what it names: data first, then the name
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder entry under ``folder`` to the disk, so that a power loss after
    the rename cannot leave a checkpoint whose files are empty."""
    for item in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
        if item.is_file():
            with item.open("rb") as f:
                os.fsync(f.fileno())
        elif item.is_dir():
            _fsync_dir(item)
    _fsync_dir(folder)


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    # transformers draws a "Writing model shards" bar per save: noise at every checkpoint.
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def save_model(model: Any, tokenizer: Any, path: str | Path) -> Path:
    """Write a Hugging Face folder (config, safetensors weights, tokenizer) atomically."""
    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return _atomic_save(path, write)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _check_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: model folder does not exist (models are loaded from local paths only)")
    if not path.is_dir():
        raise ModelError(f"{path}: not a folder (expected a Hugging Face model folder)")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json (not a Hugging Face model folder)")
    return path


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot load the tokenizer ({' '.join(str(e).split())})") from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"{path}: the tokenizer has no eos token, so generation could never stop")
    if tokenizer.pad_token_id is None:
        # Batched rollouts need a pad id; padded positions are masked, so reusing eos is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a local model folder alone, checked as ``load_policy`` checks it: for
    backends that load the weights themselves (vLLM)."""
    return _load_tokenizer(_check_model_dir(path))


def context_length(path: str | Path) -> int | None:
    """``max_position_embeddings`` from a model folder's config.json; None when absent."""
    path = _check_model_dir(path)
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path / 'config.json'}: unreadable ({' '.join(str(e).split())})") from None
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def load_policy(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer_path: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` from a local Hugging Face causal-LM folder.

    The tokenizer comes from ``tokenizer_path`` when given, else from the model folder. A
    tokenizer without a pad token gets eos as its pad token.
    """
    from transformers import AutoModelForCausalLM

    path = _check_model_dir(path)
    tokenizer = _load_tokenizer(Path(tokenizer_path) if tokenizer_path is not None else path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot load the model ({' '.join(str(e).split())})") from None
    vocab_size = model.get_input_embeddings().weight.shape[0]
    for name in ("eos", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id")
        # E.g. a Qwen2 folder whose tokenizer_config lacks eos_token gets the default
        # "<|endoftext|>" added as a new token, outside the model's embedding.
        if token_id >= vocab_size:
            raise ModelError(
                f"{path}: the tokenizer's {name} token id {token_id} is outside the model's "
                f"vocabulary of {vocab_size}"
            )
    return model.to(device), tokenizer


def load_reference(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer_path: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Like ``load_policy``, but frozen: eval mode and no parameter requires grad."""
    model, tokenizer = load_policy(path, dtype=dtype, device=device, tokenizer_path=tokenizer_path)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Hidden states for fused log-probs
# --------------------------------------------------------------------------------------------


def _base_model(model: Any) -> nn.Module:
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        get_decoder = getattr(model, "get_decoder", None)
        base = get_decoder() if callable(get_decoder) else None
    if base is None or base is model:
        raise ModelError(f"{type(model).__name__}: cannot find the base model under the LM head")
    return base


def last_hidden_states(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, T, H] final (post-norm) hidden states of a causal LM, without the LM head.

    Together with ``lm_head_weight`` this gives the logits as ``hidden @ weight.T``, which the
    fused log-prob kernels consume without materialising [B, T, V]. Pass ``position_ids`` for
    left-padded batches (right padding needs none).
    """
    out = _base_model(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    return out.last_hidden_state


def lm_head_weight(model: Any) -> torch.Tensor:
    """[V, H] output-embedding weight (the LM head; tied to the input embedding when tied)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        # A biased head would make logits != hidden @ weight.T.
        raise ModelError(f"{type(model).__name__}: no bias-free linear LM head")
    return head.weight


# --------------------------------------------------------------------------------------------
# Critic
# --------------------------------------------------------------------------------------------


class ValueModel(nn.Module):
    """The PPO critic: a transformer backbone with a scalar value head per token.

    The head starts at zero, so initial values are 0 and early advantages equal the returns
    rather than noise from a random head.
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        # fp32 whatever the backbone's dtype: values feed a regression loss on returns.
        self.value_head = nn.Linear(hidden, 1, dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @property
    def config(self):
        return self.backbone.config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, T] float32 values, one per input position."""
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        head = self.value_head
        # Outside any bf16 autocast: the head is fp32 so that values (regression targets of
        # returns) keep their precision whatever the backbone computes in.
        with torch.autocast(hidden.device.type, enabled=False):
            return head(hidden.to(head.weight.dtype)).squeeze(-1).float()

    @classmethod
    def from_causal_lm(
        cls,
        path_or_model: str | Path | nn.Module,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
    ) -> ValueModel:
        """A critic whose backbone starts from a causal LM (a folder or a model object).

        A model object is deep-copied: the critic is trained separately and must not share
        parameters with the policy it was initialised from; it stays on the model's device unless
        ``device`` says otherwise (a folder loads to the CPU by default).
        """
        if isinstance(path_or_model, nn.Module):
            backbone = copy.deepcopy(_base_model(path_or_model))
            if device is None:
                device = next(backbone.parameters()).device
            return cls(backbone).to(device)
        device = "cpu" if device is None else device
        from transformers import AutoModelForCausalLM

        path = _check_model_dir(path_or_model)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: cannot load the model ({' '.join(str(e).split())})") from None
        return cls(_base_model(model)).to(device)

    def save_pretrained(self, save_dir: str | Path, tokenizer: Any = None) -> Path:
        """Backbone as a Hugging Face folder plus ``value_head.safetensors``, atomically."""
        from safetensors.torch import save_file

        def write(tmp: Path) -> None:
            self.backbone.save_pretrained(str(tmp))
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.value_head.state_dict().items()}
            save_file(tensors, str(tmp / VALUE_HEAD_FILE))
            (tmp / VALUE_HEAD_CONFIG).write_text(
                json.dumps({"hidden_size": self.value_head.in_features}) + "\n"
            )
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))

        return _atomic_save(save_dir, write)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> ValueModel:
        from safetensors.torch import load_file
        from transformers import AutoModel

        path = _check_model_dir(path)
        head_file = path / VALUE_HEAD_FILE
        if not head_file.is_file():
            raise ModelError(
                f"{path}: no {VALUE_HEAD_FILE} (not a saved ValueModel; use from_causal_lm "
                "to start a critic from a language model)"
            )
        try:
            backbone = AutoModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModelError(f"{path}: cannot load the backbone ({' '.join(str(e).split())})") from None
        model = cls(backbone)
        try:
            model.value_head.load_state_dict(load_file(str(head_file)))
        except (RuntimeError, OSError) as e:
            raise ModelError(f"{path}: bad {VALUE_HEAD_FILE} ({' '.join(str(e).split())})") from None
        return model.to(device)
