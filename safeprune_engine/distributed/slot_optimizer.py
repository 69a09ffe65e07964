"""SlotOptimizer: every optimizer of a solver as one torch.optim.Optimizer, so that DeepSpeed ZeRO can own them all.

The solvers keep several optimizers over the same weights (bilevel: an inner "lower" AdamW and an "outer" AdamW over
every lower parameter; alternating and two-stage: a "lower" AdamW and an "upper" one over a subset), each with its
own learning rate and its own moment estimates. DeepSpeed's ZeRO engine takes exactly one client optimizer, puts
each parameter in exactly one param group and replaces every group's parameters by flat fp32 partitions.

SlotOptimizer makes that fit without changing what any solver computes:
- each solver optimizer becomes a *slot* ("lower", "outer", "upper") and stays the object that does the maths
  (the *worker*: torch AdamW or bitsandbytes AdamW8bit, exactly as the solver's optimizer factory built it);
- parameters are grouped by the set of slots that update them (bilevel: one group; ESD-u alternating: the
  non-attn2 weights in {lower, upper} and attn2 in {lower}), so every parameter is in one group;
- step() runs only the active slot's worker, over the partitions of the groups that slot covers, with the state
  that slot keeps for those partitions. Adam-family updates are elementwise, so one step on a flat partition is
  the same update the worker makes on the whole tensors in a single process.
- `state` presents the workers' states as one mapping, keys prefixed by slot ("lower.exp_avg"), which is the
  shape DeepSpeed's own accessors (safe_get_full_optimizer_state) read.
"""
from __future__ import annotations

from collections.abc import Mapping, MutableMapping

import torch

from ..errors import SafepruneError


class SlotStateEntry(MutableMapping):
    """The optimizer state of one tensor across every slot: "slot.key" -> the worker's state["key"]."""

    def __init__(self, workers: dict[str, torch.optim.Optimizer], tensor: torch.Tensor):
        self.workers, self.tensor = workers, tensor

    def _split(self, key: str) -> tuple[dict, str]:
        slot, _, name = key.partition(".")
        if slot not in self.workers or not name:
            raise KeyError(key)
        return self.workers[slot].state[self.tensor], name

    def __getitem__(self, key):
        state, name = self._split(key)
        return state[name]

    def __setitem__(self, key, value):
        state, name = self._split(key)
        state[name] = value

    def __delitem__(self, key):
        state, name = self._split(key)
        del state[name]

    def __iter__(self):
        for slot, worker in self.workers.items():
            for name in worker.state.get(self.tensor, {}):
                yield f"{slot}.{name}"

    def __len__(self):
        return sum(len(worker.state.get(self.tensor, {})) for worker in self.workers.values())


class SlotStates(Mapping):
    """optimizer.state of a SlotOptimizer: tensor -> SlotStateEntry (a live view, never a copy)."""

    def __init__(self, workers: dict[str, torch.optim.Optimizer]):
        self.workers = workers

    def __getitem__(self, tensor):
        return SlotStateEntry(self.workers, tensor)

    def __contains__(self, tensor):
        return any(tensor in worker.state for worker in self.workers.values())

    def _tensors(self) -> list[torch.Tensor]:
        seen, found = set(), []
        for worker in self.workers.values():
            for tensor in worker.state:
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    found.append(tensor)
        return found

    def __iter__(self):
        return iter(self._tensors())

    def __len__(self):
        return len(self._tensors())


def init_worker_state(worker: torch.optim.Optimizer, tensor: torch.Tensor) -> None:
    """Create `worker`'s fresh state for `tensor` now instead of at its first step (same values as lazily).

    DeepSpeed links optimizer-state views to parameters once, after the first step, and checkpoint restore must
    write into states before any step; both need every slot's state to exist.
    """
    if worker.state.get(tensor):
        return
    group = worker.param_groups[0]
    if hasattr(worker, "init_state") and hasattr(worker, "update_step"):  # bitsandbytes Optimizer8bit family
        held, group["params"] = group["params"], [tensor]  # its config lookup reads the tensor from the group
        try:
            worker.init_state(group, tensor, 0, 0)
        finally:
            group["params"] = held
        return
    if isinstance(worker, torch.optim.Adam):  # Adam and AdamW (the same class family in torch >= 2.6)
        from torch.optim.optimizer import _get_scalar_dtype

        if group.get("fused") or group.get("capturable"):
            raise SafepruneError("fused or capturable torch Adam cannot be a ZeRO solver optimizer")
        state = worker.state[tensor]
        state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
        state["exp_avg"] = torch.zeros_like(tensor, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(tensor, memory_format=torch.preserve_format)
        if group.get("amsgrad"):
            state["max_exp_avg_sq"] = torch.zeros_like(tensor, memory_format=torch.preserve_format)
        return
    raise SafepruneError(f"{type(worker).__name__} cannot be a ZeRO solver optimizer: only torch Adam/AdamW and "
                         "bitsandbytes optimizers are supported")


class SlotOptimizer(torch.optim.Optimizer):
    """One optimizer over the union of the solver optimizers' parameters (see the module docstring).

    optimizers: slot name -> an optimizer with one param group (what a solver's optimizer factory returns). Their param
    lists are emptied (they are filled per step) and their states are kept per tensor as usual. `active` names the
    slot the next step() applies.
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        if not optimizers:
            raise SafepruneError("SlotOptimizer needs at least one solver optimizer")
        members: dict[int, list[str]] = {}
        order: list[torch.Tensor] = []
        self.slot_params: dict[str, list[torch.Tensor]] = {}
        for slot, optimizer in optimizers.items():
            if "." in slot:
                raise SafepruneError(f"solver optimizer name {slot!r} must not contain '.'")
            if len(optimizer.param_groups) != 1:
                raise SafepruneError(f"solver optimizer {slot!r} has {len(optimizer.param_groups)} param groups; "
                                     "ZeRO supports solver optimizers with one group")
            params = list(optimizer.param_groups[0]["params"])
            self.slot_params[slot] = params
            for param in params:
                if id(param) not in members:
                    members[id(param)] = []
                    order.append(param)
                members[id(param)].append(slot)
        groups: dict[tuple[str, ...], list[torch.Tensor]] = {}
        for param in order:
            groups.setdefault(tuple(members[id(param)]), []).append(param)
        first = next(iter(optimizers.values())).param_groups[0]
        param_groups = [{"params": params, "slots": slots, "lr": optimizers[slots[0]].param_groups[0]["lr"]}
                        for slots, params in groups.items()]
        super().__init__(param_groups, defaults={"lr": first["lr"]})
        self.workers = dict(optimizers)
        for worker in self.workers.values():
            worker.param_groups[0]["params"] = []
            worker.state.clear()
        self.state = SlotStates(self.workers)
        # ZeRO swaps the param_groups list around each group's step, but keeps (and edits) these dicts
        self.all_groups = list(self.param_groups)
        self.active: str | None = None

    def groups_of(self, slot: str) -> list[dict]:
        return [group for group in self.all_groups if slot in group["slots"]]

    def materialize(self, tensors_by_group: list[tuple[dict, torch.Tensor]] | None = None) -> None:
        """Create every slot's state for every tensor (default: the tensors the groups currently hold)."""
        if tensors_by_group is None:
            tensors_by_group = [(group, tensor) for group in self.all_groups for tensor in group["params"]]
        for group, tensor in tensors_by_group:
            for slot in group["slots"]:
                init_worker_state(self.workers[slot], tensor)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise SafepruneError("SlotOptimizer.step does not take a closure")
        slot = self.active
        if slot is None:
            raise RuntimeError("SlotOptimizer.step() needs an active slot (set .active to a solver optimizer name)")
        self.materialize()
        self.materialize([(group, tensor) for group in self.param_groups for tensor in group["params"]])
        tensors = [tensor for group in self.param_groups if slot in group["slots"] for tensor in group["params"]
                   if tensor.grad is not None]
        if not tensors:
            return None
        worker = self.workers[slot]
        worker.param_groups[0]["params"] = tensors
        try:
            worker.step()
        finally:
            worker.param_groups[0]["params"] = []
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.all_groups:
            for tensor in group["params"]:
                if tensor.grad is not None:
                    if set_to_none:
                        tensor.grad = None
                    else:
                        tensor.grad.zero_()
