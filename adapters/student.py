"""The shared-weights teacher and MeanFlow student of any family (the adapter core).

The student ``u(z, r, t, **cond)`` (MeanFlow, arXiv 2505.13447) is the family's transformer
with LoRA updates (:func:`mfcore.adapters.lora.add_lora`, base frozen, trained weights fp32)
and an :class:`~mfcore.adapters.interval.IntervalEmbedding` of ``t - r`` added by forward
hooks at the family's time-conditioning modules. Both start at zero, so
``u(z, r, t) = v_teacher(z, t)`` bit for bit for every ``r`` before training. The teacher
``v(z, t, **cond)`` is the same transformer with every adapter off
(:func:`~mfcore.adapters.lora.lora_disabled`, our own switch, which leaves ``requires_grad``
alone) and the interval branch off: the base weights exist once, and nothing is copied.

What differs between families (how to call the model, packing, time units, conditioning,
LoRA targets, hook points) comes from a :class:`~mfcore.adapters.family.Family`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from mfcore._checks import check_choice, check_instance, check_interval, check_real, check_time
from mfcore.adapters._durable import read_json
from mfcore.adapters._state import read_tensors
from mfcore.adapters.family import Family
from mfcore.adapters.lora import (
    LoraSpec,
    adapter_parameters,
    add_lora,
    load_lora_state_dict,
    lora_active,
    lora_disabled,
    lora_state_dict,
    pinned_checkpointing,
)
from mfcore.adapters.routing import (
    ATTENTION_MODES,
    AttentionRouting,
    checkpointing_off,
    has_tangent,
    route_attention,
)
from mfcore.guidance import apg_velocity

__all__ = [
    "INTERVAL_WEIGHT_NAME",
    "GUIDANCE_RULES",
    "R_EMBEDDINGS",
    "check_cond_keys",
    "pinned_velocity",
    "Teacher",
    "SharedWeightsStudent",
    "MeanFlowStudent",
    "load_student",
    "student_kwargs",
    "read_student_config",
    "read_saved_config",
    "split_state",
    "load_exactly",
]

INTERVAL_WEIGHT_NAME = "interval_embedding.safetensors"
#: How :class:`Teacher` combines its two guided passes.
GUIDANCE_RULES = ("cfg", "apg")
#: How a student takes its second time ``r``: ``"interval"``, mfcore's zero-initialised
#: embedding of ``t - r`` added to the model's time embedding (every family; the student
#: equals the teacher for every ``r`` at init); ``"native"``, the model's own ``r`` input
#: where its family has one (HunyuanImage 2.1's ``use_meanflow``, which stock diffusers
#: pipelines run; :meth:`~mfcore.adapters.family.TrainingFamily.native_student`).
R_EMBEDDINGS = ("interval", "native")
_HALF = (torch.float16, torch.bfloat16)


def check_cond_keys(family: Family, cond: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` naming a keyword that ``family``'s calls do not take."""
    unknown = sorted(set(cond) - family.cond_keys)
    if unknown:
        raise TypeError(
            f"unexpected keyword argument {unknown[0]!r} for a {family.label} model "
            f"(it takes {sorted(family.cond_keys)})"
        )


def pinned_velocity(family: Family, model: nn.Module, z: Tensor, t: Tensor, inputs: dict) -> Tensor:
    """``family.velocity`` of one checked call, with gradient checkpointing pinned to the
    adapters active now (a recomputed block keeps this call's LoRA switches)."""
    with pinned_checkpointing(model):
        return family.velocity(model, z, t, inputs)


class Teacher:
    """A family's transformer as a frozen :class:`mfcore.fields.VelocityField` ``v(z, t)``.

    Runs under ``torch.no_grad()`` with every LoRA update off, so it shares the transformer
    of a student.

    Args:
        transformer: the family's transformer.
        family: its conventions.
        guidance_scale: default guidance input of a guidance-distilled checkpoint.
        true_cfg_scale: scale ``s`` of two-pass guidance; 1 disables it (one pass,
            negatives unused).
        rule: how the two passes combine: ``"cfg"``, classifier-free guidance
            ``v = v_neg + s (v_pos - v_neg)``; ``"apg"``, adaptive projected guidance without
            momentum (:func:`mfcore.guidance.apg_velocity`, ``eta = 0``), as HunyuanImage
            2.1's release guides after its first steps.
        apg_norm_threshold: APG's largest norm of ``v_pos - v_neg`` per sample (0: none; the
            2.1 release's is 10).
        validate: check each call's arguments; off, the call trusts them (see
            :attr:`SharedWeightsStudent.validate`).
    """

    def __init__(
        self,
        transformer: nn.Module,
        family: Family,
        *,
        guidance_scale: float = 3.5,
        true_cfg_scale: float = 1.0,
        rule: str = "cfg",
        apg_norm_threshold: float = 10.0,
        validate: bool = True,
    ) -> None:
        self.family = family
        self.validate = bool(validate)
        self.transformer = family.check_model(transformer)
        self.guidance_scale = check_real("guidance_scale", guidance_scale)
        self.true_cfg_scale = check_real("true_cfg_scale", true_cfg_scale, minimum=1.0)
        self.rule = check_choice("rule", rule, GUIDANCE_RULES)
        self.apg_norm_threshold = check_real("apg_norm_threshold", apg_norm_threshold, minimum=0.0)

    def check_inputs(self, z: Tensor, cond: Mapping[str, Any]) -> None:
        """Check a batch's latents ``z`` and condition as each call of this teacher (and of
        its student, which takes a subset) would: the one check per batch of a training loop
        whose calls skip theirs (``validate=False``)."""
        check_cond_keys(self.family, cond)
        cfg = self.true_cfg_scale != 1.0
        self.family.call_inputs(self.transformer, z, cond, self.guidance_scale, cfg)

    def __call__(self, z: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """Velocity ``v(z, t) = eps - x`` of the (guided) teacher, ``z``'s shape and dtype."""
        tr, cfg = self.transformer, self.true_cfg_scale != 1.0
        if self.validate:
            check_cond_keys(self.family, cond)
            check_time("t", t, z)
        call = self.family.call_inputs(
            tr, z, cond, self.guidance_scale, cfg, validate=self.validate
        )
        with torch.no_grad(), lora_disabled(tr):
            v = pinned_velocity(self.family, tr, z, t, call.inputs)
            if cfg:
                assert call.negative is not None
                v_neg = pinned_velocity(self.family, tr, z, t, call.negative)
                if self.rule == "apg":
                    v = apg_velocity(v, v_neg, self.true_cfg_scale,
                                     norm_threshold=self.apg_norm_threshold)  # fmt: skip
                else:
                    v = v_neg + self.true_cfg_scale * (v - v_neg)
        return v


class SharedWeightsStudent(nn.Module):
    """What every student on a shared transformer has: the transformer (with LoRA), its
    family, and the teacher on the same base weights.

    Subclasses set ``transformer``, ``family``, ``guidance_scale`` and ``adapter_name``.

    Attributes:
        validate: check each call's arguments (the default), as a public entry should. A
            training loop whose data were checked once, when they were read (mfcore-distill:
            the data folder against the model, the times by the loss), turns it off for the
            student and its :meth:`teacher`: the calls then skip the condition checks, and
            the time checks that each read the host once (``torch.distributions``'
            ``validate_args`` in spirit).
    """

    transformer: nn.Module
    family: Family
    guidance_scale: float
    adapter_name: str
    validate: bool = True

    def teacher(
        self, *, true_cfg_scale: float = 1.0, rule: str = "cfg", apg_norm_threshold: float = 10.0
    ) -> Teacher:
        """The teacher on the same base weights (LoRA and the student's additions off);
        the arguments are :class:`Teacher`'s."""
        return Teacher(
            self.transformer,
            self.family,
            guidance_scale=self.guidance_scale,
            true_cfg_scale=true_cfg_scale,
            rule=rule,
            apg_norm_threshold=apg_norm_threshold,
            validate=self.validate,
        )

    def _train_in_fp32(self) -> None:
        """Keep the student's own trained weights in fp32 on a half-precision base, so small
        optimiser steps are not rounded away (the layers cast their inputs to them)."""
        foreign = self._foreign_lora()
        for p in self.parameters():
            if p.requires_grad and id(p) not in foreign and p.dtype in _HALF:
                p.data = p.data.float()

    def _foreign_lora(self) -> set[int]:
        """Ids of the LoRA weights of other adapters on the shared transformer (a critic's)."""
        others = set(getattr(self.transformer, "peft_config", {})) - {self.adapter_name}
        return {
            id(p) for name in others for p in adapter_parameters(self.transformer, name).values()
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's trained parameters: its LoRA weights and additions (``requires_grad``),
        not the weights of other adapters that share the transformer."""
        foreign = self._foreign_lora()
        return [p for p in self.parameters() if p.requires_grad and id(p) not in foreign]

    def parameter_counts(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts (works on the meta device); other adapters
        on the shared transformer count in neither."""
        foreign = self._foreign_lora()
        params = [p for p in self.parameters() if id(p) not in foreign]
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


class MeanFlowStudent(SharedWeightsStudent):
    """A family's transformer as a MeanFlow student ``u(z, r, t, **cond)``.

    See the module docstring. Attention runs as :mod:`mfcore.adapters.routing` says for
    ``attention`` (``"auto"``, ``"math"`` or ``"mfcore"``; pick it with
    :func:`~mfcore.adapters.routing.attention_mode_for`). Gradient checkpointing is switched
    off for a call that takes a JVP with a graph (it cannot recompute forward-mode AD).

    Args:
        transformer: the family's transformer (modified in place: LoRA, hooks, routing).
        family: its conventions (default: the class's ``default_family``).
        lora: LoRA rank and targets (targets None: the family's default).
        guidance_scale: guidance input of a guidance-distilled checkpoint (the student
            distils the teacher at this scale).
        adapter_name: peft's name for the adapter.
        attention: the attention mode.
    """

    #: The family of a subclass that is one family's student (``family`` may then be omitted).
    default_family: Family | None = None
    #: How ``r`` enters (one of :data:`R_EMBEDDINGS`), and the file of :attr:`interval`'s
    #: weights in a saved student.
    r_embedding = "interval"
    interval_file = INTERVAL_WEIGHT_NAME

    def __init__(
        self,
        transformer: nn.Module,
        family: Family | None = None,
        *,
        lora: LoraSpec | None = None,
        guidance_scale: float = 3.5,
        adapter_name: str = "mfcore",
        attention: str = "auto",
    ) -> None:
        super().__init__()
        family = self._family(family)
        family.check_model(transformer)
        check_instance("lora", lora, LoraSpec, "a LoraSpec or None", optional=True)
        self._routing = AttentionRouting(attention)
        route_attention(family.attention_modules(transformer), self._routing)
        self.family = family
        self.lora_spec = (lora or LoraSpec()).with_default_targets(family.lora_targets(transformer))
        self.guidance_scale = check_real("guidance_scale", guidance_scale)
        self.adapter_name = adapter_name
        self.transformer = transformer
        add_lora(transformer, self.lora_spec, adapter_name=adapter_name)
        self.interval, points = self._r_input(transformer)
        self._train_in_fp32()
        self._delta: Tensor | None = None
        self._hooks = [p.register_forward_hook(self._add_interval) for p in points]

    @classmethod
    def _family(cls, family: Family | None) -> Family:
        """``family``, else the class's ``default_family`` (``TypeError`` if neither)."""
        if family is None and cls.default_family is None:
            raise TypeError("family is required (this student class has no default_family)")
        return family if family is not None else cls.default_family

    @property
    def attention(self) -> str:
        """How attention runs: ``"auto"``, ``"math"`` or ``"mfcore"``."""
        return self._routing.mode

    @attention.setter
    def attention(self, mode: str) -> None:
        self._routing.mode = check_choice("attention", mode, ATTENTION_MODES)

    def _r_input(self, transformer: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
        """The trained module that embeds ``r`` and the modules whose outputs it is added
        to: the family's zero-initialised interval embedding, added at its time embedding."""
        return self.family.interval_embedding(transformer)

    def _call_inputs(self, inputs: dict[str, Any], r: Tensor) -> dict[str, Any]:
        """The model call's inputs for end times ``r`` (the interval reaches the model
        through the hooks, so the family's inputs are unchanged)."""
        return inputs

    def _add_interval(self, module: nn.Module, args: tuple, temb: Tensor) -> Tensor | None:
        if self._delta is None:
            return None
        return temb + self.interval(self._delta).to(temb.dtype)

    @contextlib.contextmanager
    def _interval_on(self, delta: Tensor) -> Iterator[None]:
        self._delta = delta
        try:
            yield
        finally:
            self._delta = None

    def forward(self, z: Tensor, r: Tensor, t: Tensor, **cond: Any) -> Tensor:
        """Average velocity ``u(z_t, r, t)``; one step is ``z_r = z_t - (t - r) u``.

        Args:
            z: latents ``(B, C, H, W)`` at time ``t``.
            r: end times ``(B,)``, ``r <= t``.
            t: start times ``(B,)`` in ``[0, 1]``.
            **cond: the family's conditioning; negative prompts are accepted and ignored
                (the student distils the guided teacher in one pass, so one ``cond``
                serves teacher and student).

        Returns:
            ``u`` ``(B, C, H, W)`` in ``z``'s dtype.
        """
        tr = self.transformer
        if self.validate:
            check_cond_keys(self.family, cond)
            check_interval(r, t, z)
        call = self.family.call_inputs(
            tr, z, cond, self.guidance_scale, False, validate=self.validate
        )
        jvp_graph = torch.is_grad_enabled() and has_tangent(z, t)
        with (
            self._interval_on(t - r),
            checkpointing_off(tr, jvp_graph),
            lora_active(tr, self.adapter_name),
        ):
            return pinned_velocity(self.family, tr, z, t, self._call_inputs(call.inputs, r))

    # ----------------------------------------------------------------------- trainable state

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """Every trained tensor, keyed ``lora.<module>...`` and ``interval.<name>``, detached."""
        state = {
            f"lora.{k}": v
            for k, v in lora_state_dict(self.transformer, adapter_name=self.adapter_name).items()
        }
        state.update({f"interval.{k}": v.detach() for k, v in self.interval.state_dict().items()})
        return state

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load a :meth:`trainable_state_dict`; every key must match (``ValueError`` otherwise)."""
        lora, interval = split_state(state, ("lora.", "interval."))
        load_lora_state_dict(self.transformer, lora, adapter_name=self.adapter_name)
        load_exactly(self.interval, interval, "interval")

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the trained state to ``directory`` as safetensors plus JSON (no pickle).

        Files: ``pytorch_lora_weights.safetensors`` (diffusers' LoRA format for the family),
        ``interval_embedding.safetensors``, the family's student config (LoRA spec,
        guidance scale, transformer config) and a ``README.md`` model card that says how to
        load it (and that the stock diffusers pipeline runs only its ``r = t`` field).
        """
        directory = str(directory)
        os.makedirs(directory, exist_ok=True)
        self.family.save_lora(directory, self.transformer, self.adapter_name)
        interval = {k: v.detach().contiguous() for k, v in self.interval.state_dict().items()}
        save_file(interval, os.path.join(directory, self.interval_file))
        meta = {
            "format": self.family.student_format,
            "version": 1,
            "family": self.family.name,
            "r_embedding": self.r_embedding,
            "lora": self.lora_spec.to_dict(),
            "guidance_scale": self.guidance_scale,
            "adapter_name": self.adapter_name,
            "transformer_config": self.family.config_summary(self.transformer),
        }
        with open(os.path.join(directory, self.family.student_config_name), "w") as f:
            json.dump(meta, f, indent=2)
        with open(os.path.join(directory, "README.md"), "w") as f:
            f.write(self._model_card())

    def _model_card(self) -> str:
        """The saved student's ``README.md``."""
        return _MODEL_CARD.format(label=self.family.label, rank=self.lora_spec.rank)

    def load_pretrained(self, directory: str | os.PathLike) -> None:
        """Load what :meth:`save_pretrained` wrote into this student (same LoRA spec and model)."""
        meta = read_student_config(directory, self.family)
        saved = meta.get("r_embedding", "interval")
        summary = self.family.config_summary(self.transformer)
        problems = []
        if saved != self.r_embedding:
            problems.append(
                f"r_embedding {saved!r}, this one takes {self.r_embedding!r} (load it with "
                "load_student)"
            )
        if meta["transformer_config"] != summary:
            problems.append(f"transformer {meta['transformer_config']}, not this one {summary}")
        if LoraSpec(**meta["lora"]) != self.lora_spec:
            problems.append(f"LoRA {meta['lora']}, this student {self.lora_spec.to_dict()}")
        if problems:
            raise ValueError(f"{directory} holds another student: " + "; ".join(problems))
        self.family.load_lora(str(directory), self.transformer, self.adapter_name)
        path = os.path.join(directory, self.interval_file)
        load_exactly(self.interval, read_tensors(path, what="student file"), "interval")

    @classmethod
    def from_pretrained(
        cls, transformer: nn.Module, directory: str | os.PathLike, family: Family | None = None
    ) -> MeanFlowStudent:
        """Build a student on ``transformer`` from a :meth:`save_pretrained` folder."""
        family = cls._family(family)
        student = cls(transformer, family, **student_kwargs(directory, family))
        student.load_pretrained(directory)
        return student


_MODEL_CARD = """# A few-step MeanFlow student of a {label} checkpoint

Written by mfcore (`MeanFlowStudent.save_pretrained`): a rank-{rank} LoRA
(`pytorch_lora_weights.safetensors`, diffusers' format) and an interval embedding of `t - r`
(`interval_embedding.safetensors`) on the base checkpoint's own weights. One step is
`z_r = z_t - (t - r) u(z_t, r, t)`.

Generate with it:

    mfcore-distill generate --model BASE --student THIS_FOLDER --prompt "..." \\
        --steps 1 2 4 --output images

or in Python, `MeanFlowPipeline.from_pretrained(BASE, student=THIS_FOLDER)(prompt,
num_inference_steps=2).images` (`mfcore.adapters.pipeline`).

**Not with the stock diffusers pipeline.** Its transformer has no input for the interval:
`pipe.load_lora_weights(THIS_FOLDER)` loads the LoRA and ignores the interval embedding, so
it runs the student at `r = t` (its instantaneous velocity), a different model, not the
few-step student.
"""


def load_student(
    transformer: nn.Module, directory: str | os.PathLike, family: Family
) -> MeanFlowStudent:
    """Build a student on ``transformer`` from a :meth:`MeanFlowStudent.save_pretrained` folder
    (with the ``r`` input it was trained with, :data:`R_EMBEDDINGS`)."""
    meta = read_student_config(directory, family)
    if meta.get("r_embedding", "interval") == "native":
        student = family.native_student(transformer, **student_kwargs(directory, family))
        student.load_pretrained(directory)
        return student
    return MeanFlowStudent.from_pretrained(transformer, directory, family)


def student_kwargs(directory: str | os.PathLike, family: Family) -> dict[str, Any]:
    """The constructor arguments recorded in a student folder of ``family``."""
    meta = read_student_config(directory, family)
    return {
        "lora": LoraSpec(**meta["lora"]),
        "guidance_scale": meta["guidance_scale"],
        "adapter_name": meta["adapter_name"],
    }


def read_student_config(directory: str | os.PathLike, family: Family) -> dict[str, Any]:
    """The JSON config of a student folder of ``family``.

    Raises:
        FileNotFoundError: if the folder holds no such config.
        ValueError: if the config is another family's or another format.
    """
    return read_saved_config(
        directory, family.student_config_name, family.student_format, family.label
    )


def read_saved_config(
    directory: str | os.PathLike, name: str, fmt: str, label: str
) -> dict[str, Any]:
    """The JSON config ``name`` of a saved ``label`` student: an object whose ``format`` is
    ``fmt``.

    Raises:
        FileNotFoundError: if ``directory`` holds no ``name``.
        ValueError: if it holds another JSON value or format.
    """
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no saved {label} student at {directory} (missing {name})")
    meta = read_json(path, "student config")
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        held = f"format {meta.get('format')!r}" if isinstance(meta, dict) else "no JSON object"
        raise ValueError(f"{path} is not a saved {label} student ({held})")
    return meta


def split_state(state: Mapping[str, Tensor], prefixes: tuple[str, ...]) -> list[dict]:
    """A saved student state's entries under each of ``prefixes``, the prefix cut off
    (``ValueError`` naming keys under none)."""
    other = [k for k in state if not k.startswith(prefixes)]
    if other:
        raise ValueError(f"unexpected keys in the student state: {other[:3]}")
    return [{k[len(p) :]: v for k, v in state.items() if k.startswith(p)} for p in prefixes]


def load_exactly(module: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """Load ``state`` into ``module``: the same keys and shapes, or one ``ValueError`` that
    names every missing, unexpected and reshaped entry of the ``what`` state."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    reshaped = [
        f"{k} {tuple(v.shape)}, this one's {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or reshaped:
        raise ValueError(
            f"{what} state does not fit: missing {missing}, unexpected {unexpected}, "
            f"shape of {reshaped}"
        )
    module.load_state_dict(state)
