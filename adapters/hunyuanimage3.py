"""HunyuanImage 3.0 on the adapter core, through NVIDIA NeMo Automodel's native class.

``nemo_automodel.components.models.hunyuan_image3.model.HunyuanImage3ForCausalMM``
(``nemo-automodel==0.7.0``, installed with ``pip install --no-deps``; see
``docs/hunyuanimage.md``): an 80B-total, 13B-active MoE decoder that reads text and image
tokens in one sequence. Its conventions, converted here and nowhere else:

- ``forward(input_ids, latents, timestep, valid_lengths) -> (velocity,)``; ``timestep`` is
  ``sigma * 1000``, the output ``noise - x0``: mfcore's ``v`` with ``t = sigma``.
- the sequence is ``<bos> prompt <boi> <img_size_*> <img_ratio_*> <timestep> <img> x (h w)
  <eoi>``, right-padded, with ``valid_lengths`` the unpadded lengths; the ratio token names
  the image's aspect-ratio bucket (:func:`release_ratio_index`); latents ``(B, 32, h, w)``
  from a 16x VAE, one ``<img>`` token per latent pixel. The condition is the token ids
  (``input_ids``, ``valid_lengths``); two-pass CFG replaces the prompt by ``<cfg>`` tokens of
  the same length (``negative_input_ids``).
- t enters three times: as the ``<timestep>`` token's embedding (``timestep_emb``), as the
  time conditioning of the patch embedding (``time_embed``) and of the final layer
  (``time_embed_2``); the interval embedding is added to the first two outputs by hooks
  (``time_embed_2`` is left alone).
- LoRA on attention (``self_attn.qkv_proj``, ``o_proj``) and the shared expert
  (``shared_mlp.gate_and_up_proj``, ``down_proj``). The 64 routed experts are stacked
  parameters, not ``nn.Linear`` layers (peft cannot wrap them), and each sees only the
  tokens its top-8 router sends it.
- forward-mode AD (the ``func`` JVP): attention goes through :mod:`mfcore.attention` while a
  tangent is present; the routed experts' fused SwiGLU ``autograd.Function`` (no forward-AD
  rule) is replaced by the same math in plain torch; ``GroupNorm32`` inputs are made
  contiguous (torch's forward-AD formula of ``group_norm`` fails on the channels-last view
  the final layer makes). Top-k routing is piecewise constant in its input, so a finite
  difference (``fd``) can jump across a routing change: use ``func`` or ``autograd``.
- schedule: a constant shift, the checkpoint's ``flow_shift`` (3.0 in the release).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from nemo_automodel.components.models.common import BackendConfig
from nemo_automodel.components.models.hunyuan_image3.config import HunyuanImage3Config
from nemo_automodel.components.models.hunyuan_image3.layers import (
    GroupNorm32,
    HunyuanImage3Attention,
    TimestepEmbedder,
)
from nemo_automodel.components.models.hunyuan_image3.model import HunyuanImage3ForCausalMM
from safetensors.torch import load_file
from torch import Tensor, nn

from mfcore.adapters._durable import read_json
from mfcore.adapters._shapes import Shape
from mfcore.adapters.family import Call, FamilyBase, Synthetic
from mfcore.adapters.interval import IntervalEmbedding
from mfcore.adapters.student import MeanFlowStudent

__all__ = [
    "FAMILY",
    "HunyuanImage3Family",
    "HY3_CONFIG",
    "TINY_HY3_CONFIG",
    "TINY_TOKENS",
    "BACKEND",
    "DEFAULT_SHIFT",
    "lora_targets",
    "build_model",
    "make_jvp_ready",
    "HunyuanImage3Student",
    "SequenceBuilder",
    "release_ratio_index",
]

#: NeMo's defaults are the release's config (81.30B parameters, 13.65B active per token).
HY3_CONFIG: dict[str, Any] = {}
#: A random HunyuanImage 3.0: 2 layers, hidden 64, 4 heads of 16 (2 KV), 4 experts top-2,
#: one shared expert, 4 latent channels (about 0.26M parameters).
TINY_HY3_CONFIG: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 64,
    "intermediate_size": 64,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "attention_head_dim": 16,
    "num_experts": 4,
    "moe_topk": 2,
    "num_shared_expert": 1,
    "use_mixed_mlp_moe": True,
    "patch_embed_hidden_dim": 32,  # GroupNorm32 needs a multiple of 32
    "vae": {"latent_channels": 4},
    "image_token_id": 6,
    "timestep_token_id": 5,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 7,
    "torch_dtype": "float32",
}
#: The tiny vocabulary's special tokens (the release's come from its tokenizer).
#: One id stands for every aspect-ratio bucket (a random model has no use for 33).
TINY_TOKENS = {"<boi>": 2, "<img_size_1024>": 3, "<cfg>": 8} | {
    f"<img_ratio_{i}>": 4 for i in range(33)
}
#: Plain-torch kernels: what runs on a CPU and under forward-mode AD.
BACKEND = dict(
    attn="sdpa", linear="torch", rms_norm="torch", experts="torch", dispatcher="torch", rope="torch"
)
#: The release's ``flow_shift`` (its ``generation_config.json``).
DEFAULT_SHIFT = 3.0

_LAYER_TARGETS = (
    "self_attn.qkv_proj",
    "self_attn.o_proj",
    "shared_mlp.gate_and_up_proj",
    "shared_mlp.down_proj",
)


def lora_targets(config: Any) -> tuple[str, ...]:
    """Full names of every layer's attention projections and shared-expert MLP."""
    return tuple(
        f"model.layers.{i}.{n}" for i in range(config.num_hidden_layers) for n in _LAYER_TARGETS
    )


def _weighted_swiglu(y: Tensor, weights: Tensor, fp8_input_store: bool = False) -> Tensor:
    """NeMo's weighted SwiGLU (gate half first) in plain torch ops, which forward AD runs."""
    del fp8_input_store
    shape = y.shape
    gate, up = y.reshape(-1, shape[-1]).chunk(2, dim=-1)
    out = (F.silu(gate) * up * weights).to(y.dtype)
    return out if len(shape) <= 2 else out.view(shape[0], shape[1], -1)


def _contiguous(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def make_jvp_ready(model: HunyuanImage3ForCausalMM) -> HunyuanImage3ForCausalMM:
    """Let forward-mode AD through the model (the same outputs), in place, once.

    Replaces the routed experts' SwiGLU ``autograd.Function`` with plain ops and makes the
    inputs of every ``GroupNorm32`` contiguous (see the module docstring).
    """
    if getattr(model, "_mfcore_jvp_ready", False):
        return model
    for block in model.model.layers.values():
        if hasattr(block.mlp, "experts"):
            block.mlp.experts.expert_activation_grouped = _weighted_swiglu
    for module in model.modules():
        if isinstance(module, GroupNorm32):
            module.register_forward_pre_hook(_contiguous)
    model._mfcore_jvp_ready = True
    return model


def build_model(config: Mapping[str, Any], dtype: torch.dtype, seed: int = 0):
    """A randomly initialised NeMo ``HunyuanImage3ForCausalMM`` on the CPU in ``dtype``.

    NeMo's constructor leaves the weights uninitialised; ``initialize_weights`` fills them.
    NeMo 0.7.0 keeps ``shared_mlp.gate_and_up_proj`` in fp32 by mistake (its fp32 keep-list
    entry ``mlp.gate`` matches it as a substring), which breaks any non-fp32 forward: it is
    cast back here.
    """
    torch.manual_seed(seed)
    model = HunyuanImage3ForCausalMM(
        HunyuanImage3Config(**config), backend=BackendConfig(**BACKEND)
    )
    model.initialize_weights(buffer_device=torch.device("cpu"), dtype=dtype)
    for block in model.model.layers.values():
        block.shared_mlp.to(dtype)
    return make_jvp_ready(model)


def _check_tokens(
    checked: dict[str, Tensor], z: Tensor, tag: str, image_id: int, vocab: int
) -> None:
    """Raise unless every id of one prompt's (shape-checked) ``input_ids`` is in the
    vocabulary, every row holds one ``<img>`` per latent pixel of ``z`` and every
    ``valid_lengths`` lies in ``[1, S]``: one host sync when they do."""
    ids, lengths, n = checked["input_ids"], checked.get("valid_lengths"), z.shape[2] * z.shape[3]
    in_vocab = ((ids >= 0) & (ids < vocab)).all()
    images = ((ids == image_id).sum(1) == n).all()
    ok = in_vocab & images
    if lengths is not None:
        fits = ((lengths >= 1) & (lengths <= ids.shape[1])).all()
        ok = ok & fits
    if bool(ok):
        return
    name, problems = f"{tag}input_ids", []
    if not bool(in_vocab):
        problems.append(
            f"{name} must hold token ids in [0, {vocab}) (the model's vocab_size), got ids in "
            f"[{ids.min().item()}, {ids.max().item()}]"
        )
    elif not bool(images):
        problems.append(
            f"every row of {name} needs {n} <img> tokens for {tuple(z.shape[2:])} latents"
        )
    if lengths is not None and not bool(fits):
        problems.append(
            f"{tag}valid_lengths must lie in [1, {ids.shape[1]}] (the length of {name}), got "
            f"{lengths.tolist()}: each is the unpadded length of its row"
        )
    raise ValueError("; ".join(problems))


class HunyuanImage3Family(FamilyBase):
    """HunyuanImage 3.0's conventions for the adapter core (see the module docstring)."""

    name = "hunyuanimage3"
    label = "HunyuanImage 3.0"
    class_names = ("HunyuanImage3ForCausalMM", "hunyuan_image_3_moe")
    model_class = HunyuanImage3ForCausalMM
    conditions = {
        "input_ids": Shape(("B", "S"), "int"),
        "valid_lengths": Shape(("B",), "int", required=False),
    }
    cond_keys = frozenset({*conditions, *(f"negative_{k}" for k in conditions)})
    student_config_name = "mfcore_hunyuanimage3_student.json"
    student_format = "mfcore.adapters.hunyuanimage3.HunyuanImage3Student"
    shift_key, default_shift, attention_class = "flow_shift", DEFAULT_SHIFT, HunyuanImage3Attention
    summary_keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    summary_keys += ("num_key_value_heads", "attention_head_dim", "num_experts", "latent_channels")

    def check_model(self, model: object) -> HunyuanImage3ForCausalMM:
        return make_jvp_ready(super().check_model(model))

    def call_inputs(
        self,
        model: nn.Module,
        z: Tensor,
        cond: Mapping[str, Any],
        guidance: float,
        negative: bool,
        *,
        validate: bool = True,
    ) -> Call:
        """The token ids; ``guidance`` is unused (no guidance embedding: a ``guidance``
        keyword is refused with the other unknown ones, by the caller)."""
        call = self.condition_call(model, z, cond, negative, validate=validate)
        if not validate:
            return call
        self.check_latents(model, z)
        image, vocab = model.config.image_token_id, model.config.vocab_size
        for tag, checked in (("", call.inputs), ("negative_", call.negative or {})):
            if checked:
                _check_tokens(checked, z, tag, image, vocab)
        return call

    def velocity(self, model: nn.Module, z: Tensor, t: Tensor, inputs: dict[str, Any]) -> Tensor:
        dtype = next(model.parameters()).dtype
        out = model(
            inputs["input_ids"],
            z.to(dtype),
            t * 1000,
            inputs.get("valid_lengths"),
            return_dict=False,
        )[0]
        return out.to(z.dtype)

    def lora_targets(self, model: nn.Module) -> tuple[str, ...]:
        return lora_targets(model.config)

    def interval_embedding(self, model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
        first = model.timestep_emb.mlp[0]
        mlp = TimestepEmbedder(model.config.hidden_size, dtype=first.weight.dtype)
        mlp.to(first.weight.device)
        with torch.no_grad():
            mlp.mlp[0].weight.copy_(first.weight)
            mlp.mlp[0].bias.copy_(first.bias)
        embedding = IntervalEmbedding(nn.Identity(), mlp, scale=1000.0)
        return embedding, [model.timestep_emb, model.time_embed]

    def latent_channels(self, model: nn.Module) -> int:
        return model.config.latent_channels

    # ----------------------------------------------------------------------- entry point

    data_keys = ("input_ids", "valid_lengths")
    optional_keys = ("negative_input_ids", "negative_valid_lengths")
    negative_key = "negative_input_ids"
    tiny_dims = {"channels": 4, "vocab_size": 64}
    vae_factor = 16

    def synthetic_sample(self, request: Synthetic) -> dict[str, Tensor]:
        n, seq_len, dims, g = request.n, request.seq_len, request.dims, request.generator
        size = (request.height, request.width)
        data = {"latents": torch.randn(n, dims["channels"], *size, generator=g)}
        builder = SequenceBuilder(_tiny_vocab(), TINY_HY3_CONFIG["pad_token_id"])
        lengths = torch.randint(1, seq_len + 1, (n,), generator=g).tolist()
        vocab = dims["vocab_size"]
        if vocab <= 10:
            raise ValueError(
                f"vocab_size must be > 10 (prompt tokens are drawn from 10 up, below are the "
                f"tiny model's special tokens), got {vocab}"
            )
        prompts = [torch.randint(10, vocab, (k,), generator=g).tolist() for k in lengths]
        for tag in ("", "negative_") if request.negatives else ("",):
            data |= builder(prompts, size, tag, pad_to=seq_len)
        return data

    def tiny_model(self, seed: int, dtype: torch.dtype, guidance: bool) -> nn.Module:
        if guidance:
            raise ValueError("HunyuanImage 3.0 has no guidance embedding (no --tiny-guidance)")
        return build_model(TINY_HY3_CONFIG, dtype, seed)

    def load_model(self, path: str, dtype: torch.dtype) -> tuple[nn.Module, dict[str, Any]]:
        config = read_json(os.path.join(path, "config.json"), "checkpoint config")
        if config.get("model_type") not in self.class_names:
            raise ValueError(
                f"{path} holds a {config.get('model_type')} checkpoint, not {self.label}"
            )
        config.pop("model_type", None)
        config.pop("architectures", None)
        model = build_model(config, dtype)
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        state = {k: v for f in files for k, v in load_file(os.path.join(path, f)).items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path} does not hold NeMo HunyuanImage3ForCausalMM weights: missing "
                f"{missing[:3]}, unexpected {unexpected[:3]} (convert the release with NeMo's "
                "state-dict adapter first; docs/hunyuanimage.md)"
            )
        return make_jvp_ready(model.to(dtype)), _generation_config(path)

    def load_vae(self, path: str, dtype: torch.dtype) -> nn.Module | None:
        return None  # the release's VAE is remote code (docs/hunyuanimage.md)

    def prompt_encoder(self, path: str, dtype: torch.dtype) -> TokenizerPromptEncoder:
        return TokenizerPromptEncoder(path)


FAMILY = HunyuanImage3Family()


def _generation_config(path: str) -> dict[str, Any]:
    gen = os.path.join(path, "generation_config.json")
    if not os.path.isfile(gen):
        return {}
    with open(gen) as f:
        return json.load(f)


def _tiny_vocab() -> dict[str, int]:
    cfg = TINY_HY3_CONFIG
    return TINY_TOKENS | {
        "<bos>": cfg["bos_token_id"],
        "<timestep>": cfg["timestep_token_id"],
        "<img>": cfg["image_token_id"],
        "<eoi>": cfg["eos_token_id"],
    }


@functools.cache
def _release_ratios(base_size: int) -> tuple[float, ...]:
    step, low, high = base_size // 16, base_size // 2, 2 * base_size
    sizes, h, w = [(base_size, base_size)], base_size, base_size
    while not (h >= high and w <= low):  # taller: height up, width down, by one step
        h, w = min(h + step, high), max(w - step, low)
        sizes += [(h, w), (w, h)]  # and the wide mirror image
    return tuple(sorted(a / b for a, b in sizes))


def release_ratio_index(height: int, width: int, base_size: int = 1024) -> int:
    """Index ``i`` of the ``<img_ratio_i>`` token for an image (or latent) of this shape.

    HunyuanImage 3.0 (arXiv 2509.23951) conditions on an aspect-ratio bucket. Its release
    builds 33 sizes around ``base_size``: from the square, the height grows and the width
    shrinks by ``base_size // 16`` per bucket, each side clamped to ``[base_size / 2,
    2 base_size]`` until both are at their limits, plus the mirror images; the buckets are
    sorted by ``height / width``, and an image takes the bucket whose ratio is nearest its
    own (the first on a tie). At 1024: index 0 is 512 x 2048, 16 the square, 32 2048 x 512.

    Args:
        height, width: the image's (or its latent's: only the ratio counts) height and width.
        base_size: the checkpoint's ``image_base_size``.

    Returns:
        an index in ``[0, 33)``.
    """
    ratios, r = _release_ratios(base_size), height / width
    return min(range(len(ratios)), key=lambda i: abs(ratios[i] - r))


class SequenceBuilder:
    """Token ids ``<bos> prompt <boi> <img_size_*> <img_ratio_*> <timestep> <img> x (h w)
    <eoi>``, right-padded, and their ``valid_lengths``; the negative sequence has ``<cfg>``
    in place of each prompt token.

    Args:
        vocab: ids of ``<bos>``, ``<boi>``, ``<img_size_{base_size}>``, ``<timestep>``,
            ``<img>``, ``<eoi>`` and ``<cfg>``, and of the ``<img_ratio_i>`` of the latent
            sizes to be built (:func:`release_ratio_index`; a missing one is refused).
        pad: the padding id.
        base_size: the checkpoint's ``image_base_size``.
    """

    def __init__(self, vocab: Mapping[str, int], pad: int, base_size: int = 1024) -> None:
        self.vocab = dict(vocab)
        self.size = self.vocab[f"<img_size_{base_size}>"]
        self.base_size = base_size
        self.pad = pad

    def __call__(
        self, prompts: list[list[int]], latent_size: tuple[int, int], tag: str, pad_to: int = 0
    ) -> dict[str, Tensor]:
        v, n = self.vocab, latent_size[0] * latent_size[1]
        name = f"<img_ratio_{release_ratio_index(*latent_size, self.base_size)}>"
        if name not in v:
            size = tuple(latent_size)
            raise ValueError(f"latent_size {size} needs the token {name}: not in vocab")
        rows = []
        for ids in prompts:
            body = [v["<cfg>"]] * len(ids) if tag else list(ids)
            head = [v["<bos>"], *body, v["<boi>"], self.size, v[name], v["<timestep>"]]
            rows.append(head + [v["<img>"]] * n + [v["<eoi>"]])
        width = max(max(len(r) for r in rows), pad_to + 6 + n)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        return {f"{tag}input_ids": ids, f"{tag}valid_lengths": lengths}


class TokenizerPromptEncoder:
    """``prepare``'s prompt encoding for HunyuanImage 3.0: the tokenizer's ids.

    Reads a transformers tokenizer from the checkpoint folder (or its ``tokenizer/``), looks
    up the special tokens by name (``<boi>``, ``<img_size_{image_base_size}>``,
    ``<timestep>``, ``<img>``, ``<eoi>``, ``<cfg>``, and every ``<img_ratio_i>`` it has;
    ``<bos>`` is the tokenizer's) and lays the sequence out with :class:`SequenceBuilder`, so
    the ratio token is the latent size's bucket. A prompt whose sequence exceeds the config's
    ``max_position_embeddings`` is refused.
    """

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        sub = os.path.join(path, "tokenizer")
        self.tokenizer = AutoTokenizer.from_pretrained(sub if os.path.isdir(sub) else path)
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        base = config.get("image_base_size", 1024)
        names = ["<boi>", f"<img_size_{base}>", "<timestep>", "<img>", "<eoi>", "<cfg>"]
        vocab = {n: self._id(n) for n in names}
        unknown = [n for n, i in vocab.items() if i is None]
        if unknown:
            raise ValueError(f"the tokenizer at {path} has no token {unknown[0]}")
        ratios = {f"<img_ratio_{i}>": self._id(f"<img_ratio_{i}>") for i in range(33)}
        vocab |= {n: i for n, i in ratios.items() if i is not None}
        vocab["<bos>"] = self.tokenizer.bos_token_id
        self.builder = SequenceBuilder(vocab, self.tokenizer.pad_token_id or 0, base)
        self.max_length = int(config.get("max_position_embeddings", 22800))

    def _id(self, token: str) -> int | None:
        i = self.tokenizer.convert_tokens_to_ids(token)
        return None if i is None or i == self.tokenizer.unk_token_id else i

    def __call__(
        self, prompts: list[str], latent_size: tuple[int, int], negative: str | None
    ) -> dict[str, Tensor]:
        ids = [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        n = latent_size[0] * latent_size[1]
        for i, row in enumerate(ids):
            if len(row) + n + 7 > self.max_length:
                raise ValueError(
                    f"prompt {i + 1} is too long: {len(row)} tokens and {n} image tokens exceed "
                    f"the model's {self.max_length} positions"
                )
        out = self.builder(ids, latent_size, "")
        if negative is not None:  # CFG: <cfg> in place of each prompt token
            out |= self.builder(ids, latent_size, "negative_")
        return out


class HunyuanImage3Student(MeanFlowStudent):
    """NeMo's HunyuanImage 3.0 as a MeanFlow student ``u(z, r, t, input_ids=...)``.

    The core's :class:`~mfcore.adapters.student.MeanFlowStudent` with this family's
    conventions (module docstring).

    Args:
        transformer: a NeMo ``HunyuanImage3ForCausalMM`` (modified in place).
        lora: LoRA rank and targets (default targets: :func:`lora_targets`).
        adapter_name: peft's name for the adapter.
        attention: ``"auto"``, ``"math"`` or ``"mfcore"`` (:mod:`mfcore.adapters.routing`).
    """

    default_family = FAMILY
