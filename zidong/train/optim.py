"""Optimizer, learning-rate schedule, tower freezing and objective warm-up for `zidong pretrain`.

Parameters fall into groups by owner (`text`, `vision`, `speech` tower, or `rest`: projections, fusion encoder,
heads, temperature) and by weight decay (matrices decay; biases, norms and scalars do not). Every group follows
the same warm-up + cosine curve, scaled by its tower's `model.<tower>.lr_multiplier`.

Freezing a tower (`model.<tower>.frozen_steps`):
- `-1`: for the whole run. Its parameters get `requires_grad=False` before the model is wrapped, so no
  gradient is computed or communicated for them and the optimizer holds no state for them.
- `N > 0`: for the first N steps. Its learning rate is 0 until then, and outside DeepSpeed its gradients are
  dropped before clipping, so they neither count in the clipped norm nor move the Adam moments. The parameters
  stay trainable throughout because DDP and ZeRO fix the set of trainable parameters when they wrap the model;
  under DeepSpeed, whose engine clips and steps inside `backward`, the frozen tower's gradient still counts in
  the clipped norm and the Adam moments (its learning rate is 0, so the weights do not move).

The heads of an objective that is off for the whole run (weight 0: the fusion encoder and the matching and masked
modelling heads of the tiny recipe) are frozen like a tower at `-1`, so a step touches only what trains. They stay
in the model, so checkpoints and exports keep their (initial) weights. A resumed run keeps the checkpoint's choice:
see `heads_to_freeze` in zidong/train/run.py.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import LambdaLR

from zidong.models.zidong.configuration_zidong import MODALITIES
from zidong.models.zidong.objectives_zidong import REGISTRY
from zidong.train.recipe import PretrainRecipe

if TYPE_CHECKING:
    from accelerate import Accelerator

OWNERS = (*MODALITIES, "rest")


def parameter_owners(model: torch.nn.Module) -> dict[str, str]:
    """Each parameter's name -> `text`, `vision` or `speech` (inside that tower) or `rest` (projections, fusion,
    heads, a classifier's head). Towers are found through `model.towers()`, so a model that wraps the joint model
    (`ZidongForClassification`, names `zidong.speech_model...`) or is wrapped itself (DDP's `module.`) names
    them right."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    tower_of = {id(p): modality for modality, tower in inner.towers().items() for p in tower.parameters()}
    return {name: tower_of.get(id(parameter), "rest") for name, parameter in model.named_parameters()}


def freeze_for_good(model: torch.nn.Module, recipe: PretrainRecipe) -> list[str]:
    """`requires_grad=False` on the towers with `frozen_steps: -1`; returns their names."""
    frozen = [m for m in MODALITIES if getattr(recipe.model, m).frozen_steps == -1]
    owners = parameter_owners(model)
    for name, parameter in model.named_parameters():
        if owners[name] in frozen:
            parameter.requires_grad_(False)
    return frozen


def idle_heads(recipe: PretrainRecipe, objectives: Iterable[str]) -> list[str]:
    """The heads (the joint model's modules, by attribute name) that no objective of this run trains: those of
    every registered objective whose weights in the recipe's `loss` section are all 0, unless an objective that is
    on shares them (the fusion encoder serves matching and masked modelling). `objectives`: the weight names the
    task trains with the `loss` section (none for a classifier, which freezes what it does not use itself)."""
    trained = set(objectives)
    on_heads, off_heads = set(), set()
    for objective in REGISTRY:
        names = [name for name in objective.weights if name in trained]
        if not names:
            continue
        on = any(getattr(recipe.loss, name).weight > 0 for name in names)
        (on_heads if on else off_heads).update(objective.heads)
    return sorted(off_heads - on_heads)


def freeze_heads(model: torch.nn.Module, heads: Iterable[str]) -> int:
    """`requires_grad=False` on the named heads of the joint model (before it is wrapped): no gradient, no
    optimizer state, no weight decay, no share of the clipped norm. Returns how many tensors it froze."""
    joint = model.base_model
    frozen = 0
    for head in heads:
        module = getattr(joint, head, None)
        for parameter in module.parameters() if module is not None else ():
            parameter.requires_grad_(False)
            frozen += 1
    return frozen


def build_optimizer(model: torch.nn.Module, recipe: PretrainRecipe) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, one group per (owner, decay), each with its tower's learning rate.

    torch's fused kernel, on CPU as on GPUs: on the tiny preset's 201 tensors on 2 CPU cores a step takes 2.3 ms
    against 9.1 ms per tensor and 8.4 ms with foreach (docs/PERFORMANCE.md, measurement 11)."""
    groups = []
    owners = parameter_owners(model)
    for owner in OWNERS:
        multiplier = 1.0 if owner == "rest" else getattr(recipe.model, owner).lr_multiplier
        mine = [(n, p) for n, p in model.named_parameters() if p.requires_grad and owners[n] == owner]
        for decays in (True, False):
            params = [p for _, p in mine if (p.ndim >= 2) == decays]
            if params:
                groups.append(
                    {
                        "params": params,
                        "weight_decay": recipe.train.weight_decay if decays else 0.0,
                        "lr": recipe.train.learning_rate * multiplier,
                        "owner": owner,
                    }
                )
    return torch.optim.AdamW(groups, lr=recipe.train.learning_rate, betas=(0.9, 0.98), eps=1e-6, fused=True)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: PretrainRecipe) -> LambdaLR:
    """Linear warm-up over `train.warmup_steps`, cosine decay to 0 at `train.max_steps`, 0 while frozen."""
    warmup, total = recipe.train.warmup_steps, recipe.train.max_steps

    def curve(step: int) -> float:
        if step < warmup:
            return step / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))  # past max_steps: stays at 0
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def for_group(owner: str):
        frozen = 0 if owner == "rest" else getattr(recipe.model, owner).frozen_steps
        return lambda step: curve(step) if step >= frozen else 0.0

    return LambdaLR(optimizer, [for_group(group["owner"]) for group in optimizer.param_groups])


def frozen_now(recipe: PretrainRecipe, step: int) -> list[str]:
    """Towers frozen for a limited time that are still frozen at (0-based) optimizer step `step`."""
    return [m for m in MODALITIES if step < getattr(recipe.model, m).frozen_steps]


def fill_missing_gradients(trainable: Iterable[torch.nn.Parameter]) -> None:
    """A zero gradient for every trainable parameter that got none this step (its modality was in no sample of
    the global batch). AdamW skips a parameter without a gradient but moves one with a zero gradient (momentum,
    weight decay); DeepSpeed steps flat buffers of every parameter, so without this a DeepSpeed run and a DDP or
    one-process run of the same recipe would train differently. (The heads of an objective that is off for the
    whole run are frozen instead: `idle_heads`.)"""
    for parameter in trainable:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)


def clip_gradients(
    accelerator: Accelerator, trainable: list[torch.nn.Parameter], max_norm: float, sharded: bool
) -> torch.Tensor | float:
    """Clip the gradients of `trainable` to `max_norm` in total; returns their norm before clipping.

    With plain tensors this is torch's norm and clip over every tensor in one foreach call each (accelerate's
    `clip_grad_norm_` loops over the tensors in Python on a CPU: on the tiny preset's 80 tensors on 2 cores 1.05 ms
    a step against 0.38 ms). Under DeepSpeed the engine has clipped already and this returns its global norm;
    with FSDP2's DTensor gradients (`sharded`) accelerate reduces each mesh's norm first."""
    if sharded or accelerator.state.deepspeed_plugin is not None:
        return accelerator.clip_grad_norm_(trainable, max_norm)
    accelerator.unscale_gradients()  # under fp16 loss scaling; records an overflow
    with_gradient = [parameter for parameter in trainable if parameter.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in with_gradient], foreach=True)
    torch.nn.utils.clip_grads_with_norm_(with_gradient, max_norm, norm, foreach=True)
    return norm


def drop_gradients(model: torch.nn.Module, owners: Iterable[str]) -> None:
    """Forget the gradients of the named towers (before clipping and the optimizer step)."""
    owners = set(owners)
    if owners:
        owner_of = parameter_owners(model)
        for name, parameter in model.named_parameters():
            if owner_of[name] in owners:
                parameter.grad = None


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """`learning_rate` (the base curve, from the `rest` group) and `learning_rate_<tower>` where it differs."""
    by_owner = {group["owner"]: group["lr"] for group in optimizer.param_groups}
    rates = {"learning_rate": by_owner.get("rest", 0.0)}
    for owner in MODALITIES:
        if owner in by_owner and by_owner[owner] != rates["learning_rate"]:
            rates[f"learning_rate_{owner}"] = by_owner[owner]
    return rates


def objective_weights(recipe: PretrainRecipe, step: int, objectives: Iterable[str]) -> dict[str, float]:
    """Each objective's weight at (1-based) step `step`: ramped linearly over `loss.<objective>.warmup_steps`."""
    weights = {}
    for name in objectives:
        section = getattr(recipe.loss, name)
        ramp = min(1.0, step / section.warmup_steps) if section.warmup_steps else 1.0
        weights[name] = section.weight * ramp
    return weights


def clamp_temperature(model: torch.nn.Module, deepspeed: bool) -> None:
    """Keep the contrastive temperature (`logit_scale`) at most `config.logit_scale_max`, after each optimizer
    step (where open_clip clamps it; the forward mutates no parameter). A no-op for a model without one.

    Under FSDP2 the parameter is a DTensor: each process clamps the shard it holds. Under DeepSpeed the next step
    starts from the optimizer's fp32 copy, so that is clamped too: under ZeRO-3 each process clamps its own
    partition of both; under ZeRO-1/2 the fp32 copy is assembled from every process's fragment (a collective:
    every process calls this after every step)."""
    scale = getattr(model, "logit_scale", None)
    if scale is None or not scale.requires_grad:
        return
    maximum = model.config.logit_scale_max
    with torch.no_grad():
        if not deepspeed:
            scale.clamp_(max=maximum)
        elif hasattr(scale, "ds_id"):  # ZeRO-3: the padding of a partition is zeros, which the clamp keeps
            from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

            safe_set_local_fp32_param(scale, safe_get_local_fp32_param(scale).clamp(max=maximum))
            scale.ds_tensor.clamp_(max=maximum)
            scale.clamp_(max=maximum)  # a parameter this small stays whole on every process (empty when it is not)
        else:
            from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

            master = safe_get_full_fp32_param(scale)
            if master is not None:
                safe_set_full_fp32_param(scale, master.clamp(max=maximum))
            scale.clamp_(max=maximum)
