"""Full (unpartitioned) weights and optimizer states of a ZeRO-trained student, for checkpoints and export.

Checkpoints keep the project's layout and its no-pickle rule: the student is written whole (safetensors) and the
optimizer states go into state.pt as plain tensors (torch.load(weights_only=True)). DeepSpeed's own
save_checkpoint is not used: its files are pickles that only load with weights_only=False.

Two state formats:
- "named" (torch AdamW): every slot's moments as whole tensors keyed by parameter name, plus each slot's step count.
  Independent of the ZeRO stage and the rank count, and convertible to and from the single-process format, so a
  run can resume under another --zero-stage or --nproc (or without ZeRO).
- "per-rank" (bitsandbytes AdamW8bit): blockwise-quantised moments cannot be cut at parameter boundaries, so each
  rank's partition states are kept as they are; resuming needs the same --nproc and --zero-stage.

Reading a whole tensor is a collective (every rank must call it, in the same order); only rank 0 keeps the result.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import SafepruneError

STATE_FORMAT = 1


def is_bitsandbytes(optimizer) -> bool:
    return type(optimizer).__module__.startswith("bitsandbytes")


class ZeroAccess:
    """Whole-tensor reads and writes of a DeepSpeed ZeRO engine's fp32 master weights and SlotOptimizer states.

    ZeRO-3 goes through DeepSpeed's public safe_get/safe_set helpers. For ZeRO-1/2 the state helpers would need
    DeepSpeed's lazily linked views (made after the first step), so the fragment of each parameter held by this
    rank is copied directly, from the same fragment addresses those helpers use.
    """

    def __init__(self, ds_engine, slots):
        self.engine, self.slots = ds_engine, slots
        self.optimizer = ds_engine.optimizer
        self.stage = ds_engine.zero_optimization_stage()
        if self.stage not in (1, 2, 3):
            raise SafepruneError(f"ZeroAccess needs a ZeRO engine (stage 1-3), got stage {self.stage}")

    def flats(self) -> list[tuple[dict, torch.Tensor]]:
        """(SlotOptimizer group, fp32 partition tensor) for every partition this rank owns."""
        if self.stage == 3:
            opt = self.optimizer
            return [(self.slots.all_groups[opt.sub_group_to_group_id[i]], flat)
                    for i, flat in enumerate(opt.fp32_partitioned_groups_flat)]
        partitions = self.optimizer.single_partition_of_fp32_groups
        return [(self.slots.all_groups[i], flat) for i, flat in enumerate(partitions)]

    def materialize(self) -> None:
        self.slots.materialize(self.flats())

    # ---- fp32 master weights ---------------------------------------------------------------------------------
    def full_master(self, param) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(param)
        if value is None:
            raise SafepruneError("a student parameter has no ZeRO master copy (is it frozen?)")
        return value

    def set_master(self, param, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(param, value.to(self.engine.device, torch.float32))

    # ---- optimizer states ------------------------------------------------------------------------------------
    def _fragment(self, param, key: str):
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            return None, None
        flat = self.optimizer.single_partition_of_fp32_groups[mapping.param_group_index]
        state = self.slots.state[flat][key]
        hp, lp = mapping.hp_fragment_address, mapping.lp_fragment_address
        return state.narrow(0, hp.start, hp.numel), (lp.start, lp.numel)

    def full_state(self, param, key: str) -> torch.Tensor:
        """The whole state tensor `key` ("slot.exp_avg") of `param`, on every rank (collective)."""
        if self.stage == 3:
            from deepspeed.utils import safe_get_full_optimizer_state

            return safe_get_full_optimizer_state(param, key)
        buffer = torch.zeros(param.numel(), dtype=torch.float32, device=self.engine.device)
        fragment, where = self._fragment(param, key)
        if fragment is not None:
            buffer.narrow(0, where[0], where[1]).copy_(fragment)
        dist.all_reduce(buffer, group=param._dp_group)
        return buffer.view(param.shape)

    def set_state(self, param, key: str, value: torch.Tensor) -> None:
        """Write this rank's part of a whole state tensor (local; every rank passes the whole value)."""
        value = value.to(self.engine.device, torch.float32)
        if self.stage == 3:
            from deepspeed.utils import safe_set_full_optimizer_state

            safe_set_full_optimizer_state(param, value, key)
            return
        fragment, where = self._fragment(param, key)
        if fragment is not None:
            fragment.copy_(value.reshape(-1).narrow(0, where[0], where[1]))

    def slot_flats(self, slot: str) -> list[torch.Tensor]:
        return [flat for group, flat in self.flats() if slot in group["slots"]]


def _step_value(state_step) -> float:
    return float(state_step.item() if isinstance(state_step, torch.Tensor) else state_step)


def state_keys(worker, flat: torch.Tensor) -> list[str]:
    """The elementwise state tensors of `worker` for `flat` (what the "named" format stores per parameter)."""
    state = worker.state[flat]
    return [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == flat.shape]


def gather_named_states(access: ZeroAccess, names: dict[int, str], is_main: bool) -> dict:
    """Every slot's whole per-parameter states (rank 0 keeps them) and step counts. Collective."""
    access.materialize()
    slots = access.slots
    out = {"format": STATE_FORMAT, "kind": "named", "steps": {}, "states": {}}
    for slot, params in slots.slot_params.items():
        worker = slots.workers[slot]
        flats = access.slot_flats(slot)
        steps = sorted({_step_value(worker.state[flat]["step"]) for flat in flats})
        if len(steps) > 1:
            raise SafepruneError(f"optimizer {slot!r} has partitions at different step counts {steps}")
        keys = state_keys(worker, flats[0]) if flats else ["exp_avg", "exp_avg_sq"]
        # every rank must agree on the keys (a rank may own no partition of a slot in tiny models)
        keys = sorted(set().union(*[set(k) for k in _all_gather_object(keys)]))
        per_param = {}
        for param in params:
            values = {key: access.full_state(param, f"{slot}.{key}") for key in keys}
            if is_main:
                per_param[names[id(param)]] = {k: v.detach().cpu().clone() for k, v in values.items()}
        out["steps"][slot] = max(_all_gather_object(steps[0] if steps else 0.0))
        out["states"][slot] = per_param
    return out


def restore_named_states(access: ZeroAccess, names: dict[int, str], saved: dict) -> None:
    """Write "named" states (from any stage, any rank count, or converted from a single process) into the run."""
    access.materialize()
    slots = access.slots
    for slot, params in slots.slot_params.items():
        if slot not in saved["states"]:
            raise SafepruneError(f"the checkpoint has no state for optimizer {slot!r} (has: "
                                 f"{', '.join(saved['states'])})")
        per_param = saved["states"][slot]
        for param in params:
            for key, value in per_param.get(names[id(param)], {}).items():
                access.set_state(param, f"{slot}.{key}", value)
        worker = slots.workers[slot]
        for flat in access.slot_flats(slot):
            step = saved["steps"][slot]
            state = worker.state[flat]
            if isinstance(state["step"], torch.Tensor):
                state["step"].fill_(step)
            else:
                state["step"] = int(step)


def local_states(access: ZeroAccess) -> dict:
    """This rank's partition states, slot -> list (one per owned partition) of key -> tensor."""
    access.materialize()
    out = {}
    for slot, worker in access.slots.workers.items():
        entries = []
        for flat in access.slot_flats(slot):
            entries.append({k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else torch.tensor(v))
                            for k, v in worker.state[flat].items()})
        out[slot] = entries
    return out


def gather_per_rank_states(access: ZeroAccess, context) -> dict:
    """Every rank's partition states, gathered on rank 0 (8-bit states cannot be cut per parameter)."""
    local = local_states(access)
    layout = [int(flat.numel()) for _, flat in access.flats()]
    if context.world_size > 1:
        gathered = [None] * context.world_size if context.is_main else None
        dist.gather_object({"states": local, "layout": layout}, gathered, dst=0)
    else:
        gathered = [{"states": local, "layout": layout}]
    if not context.is_main:
        return {"format": STATE_FORMAT, "kind": "per-rank"}
    return {"format": STATE_FORMAT, "kind": "per-rank", "stage": access.stage, "world_size": context.world_size,
            "layouts": [g["layout"] for g in gathered], "ranks": [g["states"] for g in gathered]}


def restore_per_rank_states(access: ZeroAccess, context, saved: dict) -> None:
    if saved.get("stage") != access.stage or saved.get("world_size") != context.world_size:
        raise SafepruneError(
            f"this checkpoint keeps 8-bit Adam states per rank (saved with --zero-stage {saved.get('stage')} on "
            f"{saved.get('world_size')} ranks); resume it with the same --zero-stage and --nproc (now "
            f"--zero-stage {access.stage}, {context.world_size} ranks)")
    layout = [int(flat.numel()) for _, flat in access.flats()]
    if saved["layouts"][context.rank] != layout:
        raise SafepruneError("the saved 8-bit Adam partitions do not match this run's partitions (different "
                             "student or DeepSpeed bucket settings); resume with the original settings")
    access.materialize()
    mine = saved["ranks"][context.rank]
    for slot, worker in access.slots.workers.items():
        for flat, entry in zip(access.slot_flats(slot), mine[slot]):
            state = worker.state[flat]
            for key, value in entry.items():
                current = state.get(key)
                if isinstance(current, torch.Tensor):
                    current.copy_(value.to(current.device, current.dtype))
                else:
                    state[key] = type(current)(value.item()) if current is not None else value.item()


def _all_gather_object(value) -> list:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


# ---- the single-process format ----------------------------------------------------------------------------------
def named_from_optimizer_states(optimizers_state: dict, slot_params: dict, names: dict[int, str]) -> dict:
    """Single-process checkpoint states (torch optimizer state_dicts per slot) -> the "named" format."""
    out = {"format": STATE_FORMAT, "kind": "named", "steps": {}, "states": {}}
    for slot, params in slot_params.items():
        if slot not in optimizers_state:
            raise SafepruneError(f"the checkpoint has no state for optimizer {slot!r}")
        saved = optimizers_state[slot]
        indices = saved["param_groups"][0]["params"]
        if len(indices) != len(params):
            raise SafepruneError(f"optimizer {slot!r}: the checkpoint holds {len(indices)} parameters, this run "
                                 f"{len(params)}")
        per_param, steps = {}, set()
        for index, param in zip(indices, params):
            entry = saved["state"].get(index)
            if not entry:
                continue
            steps.add(_step_value(entry["step"]))
            per_param[names[id(param)]] = {k: v for k, v in entry.items()
                                           if isinstance(v, torch.Tensor) and v.shape == param.shape}
        out["steps"][slot] = max(steps) if steps else 0.0
        out["states"][slot] = per_param
    return out


def optimizer_states_from_named(saved: dict, optimizers: dict, names: dict[int, str]) -> dict:
    """The "named" format -> torch optimizer state_dicts per slot (for a data-parallel or single-process run)."""
    out = {}
    for slot, optimizer in optimizers.items():
        if slot not in saved["states"]:
            raise SafepruneError(f"the checkpoint has no state for optimizer {slot!r}")
        template = optimizer.state_dict()
        params = optimizer.param_groups[0]["params"]
        per_param = saved["states"][slot]
        state = {}
        for index, param in zip(template["param_groups"][0]["params"], params):
            values = per_param.get(names[id(param)])
            if values:
                state[index] = {"step": torch.tensor(float(saved["steps"][slot])),
                                **{k: v.view(param.shape) for k, v in values.items()}}
        out[slot] = {"state": state, "param_groups": template["param_groups"]}
    return out
