"""One optimizer step that skips non-finite gradients, counts the skips, and avoids host syncs.

The authors' loop ran every step through a GradScaler that silently skipped steps whose
gradients were inf/NaN (exp(nll) overflow). We keep the skip, but count it on the device
and report it. With a fused optimizer the decision is made on the device (the optimizer's
``found_inf`` protocol, the one GradScaler uses), so a step never waits for the GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _grads_by_dtype(optimizer: torch.optim.Optimizer) -> dict[torch.dtype, list[Tensor]]:
    grads: dict[torch.dtype, list[Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                grads.setdefault(p.grad.dtype, []).append(p.grad)
    return grads


class GuardedStep:
    """Backward + optimizer step with non-finite-gradient skipping.

    ``fp16=True`` uses a dynamic ``torch.amp.GradScaler`` (loss scaling); otherwise grads
    are checked in place with scale 1. ``skipped`` is a device tensor (read it rarely).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, fp16: bool) -> None:
        self.optimizer = optimizer
        self.device = device
        self.fp16 = fp16
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16) if fp16 else None
        self.fused = all(g.get("fused", False) for g in optimizer.param_groups)
        self.skipped = torch.zeros((), device=device)
        self._one = torch.ones((), device=device)

    def __call__(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            before = self.scaler._scale.clone() if self.scaler._scale is not None else None
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if before is not None:  # the scale backs off exactly when the step was skipped
                self.skipped += (self.scaler._scale < before).float()
            return
        loss.backward()
        found_inf = torch.zeros((), device=self.device)
        for grads in _grads_by_dtype(self.optimizer).values():
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, self._one)
        self.skipped += found_inf
        if self.fused:
            self.optimizer.found_inf = found_inf
            self.optimizer.grad_scale = None
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
                del self.optimizer.grad_scale
        elif not bool(found_inf):  # host sync only on the non-fused fallback
            self.optimizer.step()

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


class HostReader:
    """Reads device scalars on the host without stalling the device.

    ``submit`` stacks the values and starts one non-blocking copy into pinned host memory
    (CUDA), recording an event behind it, and returns the *previous* submission's values as
    floats. Called once per logging interval, the event it waits on was recorded an
    interval earlier and has long completed, so the device queue never drains (a plain
    ``.item()`` waits for every kernel queued so far). ``flush`` waits for the latest
    submission (end of epoch). On the CPU the values are copied and read at once.
    Values are read as float32 (sums of losses, step counts: exact to 2^24).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pending: tuple | None = None

    def submit(self, values: dict[str, Tensor], **host: float) -> dict[str, float] | None:
        """Start reading ``values`` (0-dim device tensors; ``host`` values ride along
        unchanged); return the previous submission's values (None at the first)."""
        names = list(values)
        stacked = torch.stack([values[k].detach().float() for k in names])
        event = None
        if self.device.type == "cuda":
            copied = stacked.to("cpu", non_blocking=True)  # pinned destination, async
            event = torch.cuda.Event()
            event.record()
        else:  # CPU: nothing to wait for (other devices: one read per interval)
            copied = stacked.to("cpu", copy=True)
        previous, self._pending = self._pending, (names, copied, event, dict(host))
        return self._read(previous)

    def flush(self) -> dict[str, float] | None:
        """The latest submission's values (waits for its copy); None if there is none."""
        pending, self._pending = self._pending, None
        return self._read(pending)

    @staticmethod
    def _read(entry: tuple | None) -> dict[str, float] | None:
        if entry is None:
            return None
        names, copied, event, host_values = entry
        if event is not None:
            event.synchronize()
        return {**dict(zip(names, copied.tolist(), strict=True)), **host_values}
