"""Patch Hugging Face transformers models (5.x) to run on the liger_kernel operators.

``apply_liger_kernel_to_<model>(...)`` without ``model=`` patches transformers' modeling module itself, so every
model of that type built afterwards uses our modules: its RMSNorm and MLP classes become ours,
``apply_rotary_pos_emb`` becomes `liger_rotary_pos_emb`, and ``<Model>ForCausalLM.forward`` becomes a forward whose
loss, when training with labels, runs through the fused linear cross entropy (the logits are never materialised).

With ``model=`` an already-built model is patched in place instead: each RMSNorm and MLP instance is replaced by
ours holding the very same parameters (loaded weights, device, dtype and optimizer references are kept) and the
instance's forward is rebound; the classes of the modeling module are left alone. The rotary function is a
module-level function that attention layers look up at call time, so ``rope=True`` always patches it module-wide
(it computes the same numbers).

Per family (transformers 5.x):

- llama, mistral, qwen2, qwen3: ``<P>RMSNorm`` -> `LigerRMSNorm` (Qwen 3's per-head q/k norms too), ``<P>MLP`` ->
  `LigerSwiGLUMLP`.
- gemma: ``GemmaRMSNorm`` -> `LigerRMSNormForGemma` (``(1 + w)`` in fp32), ``GemmaMLP`` -> `LigerGEGLUMLP`.
- gemma2: as gemma with `LigerRMSNormForGemma2` (``in_place=False``); ``final_logit_softcapping`` goes into the
  loss (``softcap``).
- phi3: ``Phi3MLP`` (one fused ``gate_up_proj``) -> `LigerPhi3SwiGLUMLP`; its rotary function (partial rotary
  dimension read from cos) -> `liger_phi3_rotary_pos_emb`.
- mixtral: transformers 5 stores the experts as fused 3-D tensors (``MixtralExperts.gate_up_proj``
  ``(E, 2I, H)``, ``down_proj`` ``(E, H, I)``), no per-expert MLP modules exist; the experts class becomes a
  subclass whose gating ``silu(gate) * up`` is our SwiGLU in every experts implementation (eager loop,
  grouped_mm, batched_mm). An instance patch swaps the class of each experts module (same parameters).

Every patcher also lets sdpa models skip the causal mask under torch.compile where eager mode skips it (no padding
mask): transformers builds a full mask while compiling, which made the compiled attention 3x slower
(`_sdpa_mask`).

Patching twice is harmless: a module that is already ours is left as it is and the same forward is installed.
"""

from __future__ import annotations

import importlib
import inspect
import types
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import liger_core

from . import _hf_forward, _sdpa_mask
from .geglu import LigerGEGLUMLP
from .rms_norm import LigerRMSNorm, LigerRMSNormForGemma, LigerRMSNormForGemma2
from .rope import liger_rotary_pos_emb
from .swiglu import LigerPhi3SwiGLUMLP, LigerSwiGLUMLP


def liger_phi3_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim: int = 1):
    """Phi-3's ``apply_rotary_pos_emb``: only the first ``cos.shape[-1]`` features of each head are rotated
    (``partial_rotary_factor``), the rest pass through."""
    rotary_dim = cos.shape[-1]
    return liger_rotary_pos_emb(
        q, k, cos, sin, unsqueeze_dim=unsqueeze_dim, rotary_dim=None if rotary_dim == q.shape[-1] else rotary_dim
    )


def _liger_apply_gate(self, gate_up_out: torch.Tensor) -> torch.Tensor:
    """The experts' gating ``silu(gate) * up`` on the ``[gate; up]`` halves of the fused projection, by our SwiGLU."""
    gate, up = gate_up_out.chunk(2, dim=-1)
    # gate_up_out is the experts' own intermediate: handed over, so the gradients may reuse its storage
    return liger_core.call("swiglu", gate, up, in_place=True)


def _experts_forward(base: type):
    """The forward of ``Liger<base>``: non-eager experts implementations (grouped_mm, batched_mm) are transformers'
    own, which call our gating (`_liger_apply_gate`); the eager one is written here: each token goes through its
    top-k experts, ``down(swiglu(gate, up)) * routing weight``, summed."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        implementation = getattr(getattr(self, "config", None), "_experts_implementation", None)
        if implementation not in (None, "eager"):
            return base.forward(self, hidden_states, top_k_index, top_k_weights)
        output = torch.zeros_like(hidden_states)
        for expert in range(self.num_experts):
            tokens, slots = torch.where(top_k_index == expert)
            if tokens.numel() == 0:
                continue
            gated = self._apply_gate(F.linear(hidden_states[tokens], self.gate_up_proj[expert]))
            expert_out = F.linear(gated, self.down_proj[expert]) * top_k_weights[tokens, slots, None]
            output.index_add_(0, tokens, expert_out.to(output.dtype))
        return output

    return forward


_EXPERT_CLASSES: dict[type, type] = {}


def _liger_experts_class(base: type) -> type:
    """``Liger<base>``: transformers' fused-experts class with our SwiGLU gating (one subclass per base)."""
    if getattr(base, "_liger_experts", False):
        return base
    if base not in _EXPERT_CLASSES:
        _EXPERT_CLASSES[base] = type(
            f"Liger{base.__name__}",
            (base,),
            {
                "__module__": __name__,
                "__doc__": f"{base.__name__} whose gating silu(gate) * up runs on liger_kernel's SwiGLU.",
                "_liger_experts": True,
                "_apply_gate": _liger_apply_gate,
                "forward": _experts_forward(base),
            },
        )
    return _EXPERT_CLASSES[base]


@dataclass(frozen=True)
class _Family:
    model_type: str
    module: str  # transformers' modeling module
    prefix: str  # class-name prefix: Llama, Qwen2, ...
    norm: type
    mlp: str  # "swiglu", "geglu", "phi3" or "experts"
    rope: object

    @property
    def norm_class(self) -> str:
        return f"{self.prefix}RMSNorm"

    @property
    def mlp_class(self) -> str:
        return f"{self.prefix}Experts" if self.mlp == "experts" else f"{self.prefix}MLP"

    @property
    def causal_lm_class(self) -> str:
        return f"{self.prefix}ForCausalLM"


_FAMILIES = {
    family.model_type: family
    for family in (
        _Family("llama", "transformers.models.llama.modeling_llama", "Llama", LigerRMSNorm, "swiglu", None),
        _Family("mistral", "transformers.models.mistral.modeling_mistral", "Mistral", LigerRMSNorm, "swiglu", None),
        _Family("mixtral", "transformers.models.mixtral.modeling_mixtral", "Mixtral", LigerRMSNorm, "experts", None),
        _Family("qwen2", "transformers.models.qwen2.modeling_qwen2", "Qwen2", LigerRMSNorm, "swiglu", None),
        _Family("qwen3", "transformers.models.qwen3.modeling_qwen3", "Qwen3", LigerRMSNorm, "swiglu", None),
        _Family("gemma", "transformers.models.gemma.modeling_gemma", "Gemma", LigerRMSNormForGemma, "geglu", None),
        _Family("gemma2", "transformers.models.gemma2.modeling_gemma2", "Gemma2", LigerRMSNormForGemma2, "geglu", None),
        _Family(
            "phi3", "transformers.models.phi3.modeling_phi3", "Phi3", LigerRMSNorm, "phi3", liger_phi3_rotary_pos_emb
        ),
    )
}

_MLP_MODULES = {"swiglu": LigerSwiGLUMLP, "geglu": LigerGEGLUMLP, "phi3": LigerPhi3SwiGLUMLP}

# the original forward of each patched ForCausalLM class: its signature is the one the patched forward takes
_ORIGINAL_FORWARDS: dict[type, object] = {}


# the transformers releases the patchers are written for (and tested on: 5.0 to 5.24): >= 5.0, < 6
TRANSFORMERS_MAJOR = 5


def _check_transformers_version(owner: str) -> None:
    """transformers 4.x builds its models differently (per-expert MLP modules, no output capturing): refuse it
    clearly rather than patch it wrongly; a later major version is patched with a warning."""
    import transformers

    found = str(getattr(transformers, "__version__", "unknown"))
    major = found.split(".")[0]
    major = int(major) if major.isdigit() else None
    if major is None or major < TRANSFORMERS_MAJOR:
        raise ImportError(
            f"{owner}: needs Hugging Face transformers >= {TRANSFORMERS_MAJOR}.0, < {TRANSFORMERS_MAJOR + 1} "
            f"(found {found}); upgrade transformers, e.g. pip install 'transformers>={TRANSFORMERS_MAJOR},"
            f"<{TRANSFORMERS_MAJOR + 1}'"
        )
    if major > TRANSFORMERS_MAJOR:
        warnings.warn(
            f"{owner}: written for transformers {TRANSFORMERS_MAJOR}.x, found {found}; patching anyway (check the "
            "losses against the unpatched model)",
            stacklevel=4,
        )


def _modeling_module(family: _Family) -> types.ModuleType:
    _check_transformers_version(f"apply_liger_kernel_to_{family.model_type}")
    try:
        return importlib.import_module(family.module)
    except ImportError as error:
        raise ImportError(
            f"apply_liger_kernel_to_{family.model_type}: needs Hugging Face transformers 5.x with the "
            f"{family.model_type} model ({family.module} could not be imported: {error})"
        ) from error


def _original_forward(causal_lm: type):
    forward = causal_lm.__dict__.get("forward", causal_lm.forward)
    if not _hf_forward.is_liger_forward(forward):
        _ORIGINAL_FORWARDS[causal_lm] = forward
    if causal_lm not in _ORIGINAL_FORWARDS:  # patched by an earlier session of this process only; not expected
        raise RuntimeError(f"liger_kernel: the original {causal_lm.__name__}.forward is unknown")
    return _ORIGINAL_FORWARDS[causal_lm]


def _defined_in(module: nn.Module, modeling: types.ModuleType, class_name: str) -> bool:
    """Whether `module` is an instance of transformers' own `class_name` of `modeling` (not ours)."""
    cls = type(module)
    return cls.__name__ == class_name and cls.__module__ == modeling.__name__


def _norm_replacement(family: _Family, norm: nn.Module) -> nn.Module:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    with torch.device("meta"):  # no memory and no init for a weight that is replaced at once
        ours = family.norm(norm.weight.shape[0], eps=eps)
    ours.weight = norm.weight
    return ours.train(norm.training)


def _mlp_replacement(family: _Family, mlp: nn.Module, config) -> nn.Module:
    config = getattr(mlp, "config", None) or config
    with torch.device("meta"):
        if family.mlp == "swiglu":
            ours = LigerSwiGLUMLP(config, intermediate_size=mlp.gate_proj.out_features)
        else:
            ours = _MLP_MODULES[family.mlp](config)
    # keep transformers' own Linear modules: their loaded weights (and biases, e.g. Llama's mlp_bias) are used as is
    names = ("gate_up_proj", "down_proj") if family.mlp == "phi3" else ("gate_proj", "up_proj", "down_proj")
    for name in names:
        setattr(ours, name, getattr(mlp, name))
    return ours.train(mlp.training)


def _patch_instance(family: _Family, modeling, model: nn.Module, rms_norm: bool, mlp: bool, forward) -> None:
    config = getattr(model, "config", None)
    replacements = []  # (parent, child name, new module): all built before anything changes
    experts = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if rms_norm and _defined_in(child, modeling, family.norm_class):
                replacements.append((parent, name, _norm_replacement(family, child)))
            elif mlp and _defined_in(child, modeling, family.mlp_class):
                if family.mlp == "experts":
                    experts.append(child)
                else:
                    replacements.append((parent, name, _mlp_replacement(family, child, config)))
    for parent, name, module in replacements:
        setattr(parent, name, module)
    for module in experts:
        module.__class__ = _liger_experts_class(type(module))
    if forward is not None:
        model.forward = types.MethodType(forward, model)


def _check_flags(owner: str, **flags) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{owner}: '{name}' must be a bool, got {value!r}")


def _apply(
    family: _Family, rope, cross_entropy, fused_linear_cross_entropy, rms_norm, mlp_flag: tuple, model, extra
) -> None:
    owner = f"apply_liger_kernel_to_{family.model_type}"
    mlp_name, mlp = mlp_flag
    _check_flags(
        owner,
        rope=rope,
        cross_entropy=cross_entropy,
        fused_linear_cross_entropy=fused_linear_cross_entropy,
        rms_norm=rms_norm,
        **{mlp_name: mlp},
    )
    if cross_entropy and fused_linear_cross_entropy:
        raise ValueError(
            f"{owner}: 'cross_entropy' and 'fused_linear_cross_entropy' are mutually exclusive (the fused one "
            "already computes the loss); set one of them to False"
        )
    if extra:
        warnings.warn(
            f"{owner}: ignoring the keyword argument(s) {sorted(extra)}: it takes rope, cross_entropy, "
            f"fused_linear_cross_entropy, rms_norm, {mlp_name} and model",
            stacklevel=3,
        )
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: 'model' must be a torch.nn.Module (a built transformers model) or None")
    modeling = _modeling_module(family)
    if model is not None and not any(type(m).__module__ == modeling.__name__ for m in model.modules()):
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(
            f"{owner}: 'model' is a {type(model).__name__} (model_type {model_type!r}), not a {family.model_type} "
            "model; use _apply_liger_kernel_to_instance to pick the patcher by model type"
        )

    # compiled sdpa attention without a (B, 1, T, T) mask where eager mode needs none (see _sdpa_mask)
    _sdpa_mask.install()
    causal_lm = getattr(modeling, family.causal_lm_class)
    forward = None
    if fused_linear_cross_entropy or cross_entropy:
        mode = _hf_forward.FUSED if fused_linear_cross_entropy else _hf_forward.CROSS_ENTROPY
        forward = _hf_forward.make_forward(causal_lm, _original_forward(causal_lm), mode, family.mlp == "experts")

    if rope:
        modeling.apply_rotary_pos_emb = family.rope or liger_rotary_pos_emb
    if model is not None:
        is_causal_lm = isinstance(model, causal_lm)
        _patch_instance(family, modeling, model, rms_norm, mlp, forward if is_causal_lm else None)
        return
    if rms_norm:
        setattr(modeling, family.norm_class, family.norm)
    if mlp:
        if family.mlp == "experts":
            current = getattr(modeling, family.mlp_class)
            setattr(modeling, family.mlp_class, _liger_experts_class(current))
        else:
            setattr(modeling, family.mlp_class, _MLP_MODULES[family.mlp])
    if forward is not None:
        causal_lm.forward = forward


def apply_liger_kernel_to_llama(
    rope: bool = True,
    cross_entropy: bool = False,
    fused_linear_cross_entropy: bool = True,
    rms_norm: bool = True,
    swiglu: bool = True,
    model=None,
    **kwargs,
) -> None:
    """Patch Llama (``LlamaRMSNorm``, ``LlamaMLP``, ``apply_rotary_pos_emb``, ``LlamaForCausalLM.forward``);
    ``model=`` patches that built model in place instead of the classes."""
    _apply(
        _FAMILIES["llama"], rope, cross_entropy, fused_linear_cross_entropy, rms_norm, ("swiglu", swiglu), model, kwargs
    )


def apply_liger_kernel_to_mistral(
    rope: bool = True,
    cross_entropy: bool = False,
    fused_linear_cross_entropy: bool = True,
    rms_norm: bool = True,
    swiglu: bool = True,
    model=None,
    **kwargs,
) -> None:
    """Patch Mistral (``MistralRMSNorm``, ``MistralMLP``, ``apply_rotary_pos_emb``, ``MistralForCausalLM.forward``);
    ``model=`` patches that built model in place instead of the classes."""
    _apply(
        _FAMILIES["mistral"],
        rope,
        cross_entropy,
        fused_linear_cross_entropy,
        rms_norm,
        ("swiglu", swiglu),
        model,
        kwargs,
    )


def apply_liger_kernel_to_mixtral(
    rope: bool = True,
    cross_entropy: bool = False,
    fused_linear_cross_entropy: bool = True,
    rms_norm: bool = True,
    swiglu: bool = True,
    model=None,
    **kwargs,
) -> None:
    """Patch Mixtral (``MixtralRMSNorm``, the fused ``MixtralExperts``' gating, ``apply_rotary_pos_emb``,
    ``MixtralForCausalLM.forward``, which keeps the router's load-balancing loss); ``model=`` patches that built
    model in place instead of the classes."""
    _apply(
        _FAMILIES["mixtral"],
        rope,
        cross_entropy,
        fused_linear_cross_entropy,
        rms_norm,
        ("swiglu", swiglu),
        model,
        kwargs,
    )


def apply_liger_kernel_to_qwen2(
    rope: bool = True,
    cross_entropy: bool = False,
    fused_linear_cross_entropy: bool = True,
    rms_norm: bool = True,
    swiglu: bool = True,
    model=None,
    **kwargs,
) -> None:
    """Patch Qwen2 (``Qwen2RMSNorm``, ``Qwen2MLP``, ``apply_rotary_pos_emb``, ``Qwen2ForCausalLM.forward``);
    ``model=`` patches that built model in place instead of the classes."""
    _apply(
        _FAMILIES["qwen2"], rope, cross_entropy, fused_linear_cross_entropy, rms_norm, ("swiglu", swiglu), model, kwargs
    )


def apply_liger_kernel_to_qwen3(
    rope: bool = True,
    cross_entropy: bool = False,
    fused_linear_cross_entropy: bool = True,
    rms_norm: bool = True,
    swiglu: bool = True,
    model=None,
    **kwargs,
) -> None:
    """Patch Qwen3 (``Qwen3RMSNorm`` including the per-head q/k norms, ``Qwen3MLP``, ``apply_rotary_pos_emb``,
    ``Qwen3ForCausalLM.forward``); ``model=`` patches that built model in place instead of the classes."""
    _apply(
        _FAMILIES["qwen3"], rope, cross_entropy, fused_linear_cross_entropy, rms_norm, ("swiglu", swiglu), model, kwargs
    )


def apply_liger_kernel_to_gemma(
    rope: bool = True,
    cross_entropy: bool = False,
    fused_linear_cross_entropy: bool = True,
    rms_norm: bool = True,
    geglu: bool = True,
    model=None,
    **kwargs,
) -> None:
    """Patch Gemma (``GemmaRMSNorm`` -> `LigerRMSNormForGemma`, ``GemmaMLP`` -> `LigerGEGLUMLP`,
    ``apply_rotary_pos_emb``, ``GemmaForCausalLM.forward``); ``model=`` patches that built model in place."""
    _apply(
        _FAMILIES["gemma"], rope, cross_entropy, fused_linear_cross_entropy, rms_norm, ("geglu", geglu), model, kwargs
    )


def apply_liger_kernel_to_gemma2(
    rope: bool = True,
    cross_entropy: bool = False,
    fused_linear_cross_entropy: bool = True,
    rms_norm: bool = True,
    geglu: bool = True,
    model=None,
    **kwargs,
) -> None:
    """Patch Gemma 2 (``Gemma2RMSNorm`` -> `LigerRMSNormForGemma2`, ``Gemma2MLP`` -> `LigerGEGLUMLP`,
    ``apply_rotary_pos_emb``, ``Gemma2ForCausalLM.forward`` with the final-logit softcapping in the loss);
    ``model=`` patches that built model in place."""
    _apply(
        _FAMILIES["gemma2"], rope, cross_entropy, fused_linear_cross_entropy, rms_norm, ("geglu", geglu), model, kwargs
    )


def apply_liger_kernel_to_phi3(
    rope: bool = True,
    cross_entropy: bool = False,
    fused_linear_cross_entropy: bool = True,
    rms_norm: bool = True,
    swiglu: bool = True,
    model=None,
    **kwargs,
) -> None:
    """Patch Phi-3 (``Phi3RMSNorm``, ``Phi3MLP`` -> `LigerPhi3SwiGLUMLP`, its partial-rotary
    ``apply_rotary_pos_emb``, ``Phi3ForCausalLM.forward``); ``model=`` patches that built model in place."""
    _apply(
        _FAMILIES["phi3"], rope, cross_entropy, fused_linear_cross_entropy, rms_norm, ("swiglu", swiglu), model, kwargs
    )


MODEL_TYPE_TO_APPLY_LIGER_FN = {
    "llama": apply_liger_kernel_to_llama,
    "mistral": apply_liger_kernel_to_mistral,
    "mixtral": apply_liger_kernel_to_mixtral,
    "qwen2": apply_liger_kernel_to_qwen2,
    "qwen3": apply_liger_kernel_to_qwen3,
    "gemma": apply_liger_kernel_to_gemma,
    "gemma2": apply_liger_kernel_to_gemma2,
    "phi3": apply_liger_kernel_to_phi3,
}


def patcher_options(model_type: str) -> tuple[str, ...]:
    """The keyword arguments the patcher of `model_type` takes, ``model`` excluded."""
    parameters = inspect.signature(MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]).parameters.values()
    return tuple(p.name for p in parameters if p.kind == p.POSITIONAL_OR_KEYWORD and p.name != "model")


def _apply_liger_kernel_to_instance(model, **kwargs) -> None:
    """Patch the built `model` in place with the patcher of its ``config.model_type``, passing only the keyword
    arguments that patcher takes (transformers' Trainer calls this with ``liger_kernel_config`` when
    ``use_liger_kernel=True``). An unsupported model type gets a warning listing the supported ones and the model
    is left unchanged."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        warnings.warn(
            f"liger_kernel: model type {model_type!r} ({type(model).__name__}) is not supported, the model is left "
            f"unchanged; supported model types: {sorted(MODEL_TYPE_TO_APPLY_LIGER_FN)}",
            stacklevel=2,
        )
        return
    accepted = set(patcher_options(model_type))
    apply(model=model, **{name: value for name, value in kwargs.items() if name in accepted})
