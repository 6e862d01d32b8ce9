"""AdaLoRA done right (docs/training.md, "AdaLoRA"): the rank allocator follows optimizer
steps, and the orthogonal regularizer enters the exact objective once per step.

peft's AdaLoraModel keeps a RankAllocator that must be driven by the training loop (HF's
Trainer never does, peft issue #1327), and adds w·R(A, B) inside its forward only when the
model computed `outputs.loss` (peft #432) — llmtrain computes its own summed loss, so it adds
R itself:

  orth_regularizer   R(A, B) exactly as peft's AdaLoraModel.forward defines it
  RankAllocation     the loop's handle on the allocator: the run's length, one
                     `update_and_allocate` per optimizer step, the budget for the logs, and
                     its state (`state_dict`/`load_state_dict`) for checkpoints
"""

from __future__ import annotations

from typing import Any

import torch

from llmtrain.engine.parallel import unwrap
from llmtrain.errors import LLMTrainError

STATE_KEY = "adalora"  # where a checkpoint's train state holds the allocator's state
_SCORES = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # RankAllocator's per-parameter tensors


def adalora_tuner(model: torch.nn.Module) -> Any | None:
    """peft's AdaLoraModel inside `model` (a trainable one), or None for any other model."""
    base = getattr(unwrap(model), "base_model", None)
    return base if hasattr(base, "rankallocator") else None


def orth_regularizer(model: torch.nn.Module) -> torch.Tensor:
    """R(A, B) = mean over the adapter's A and B matrices of ||P Pᵀ - I||_F (A: P = A, rows
    the rank; B: P = Bᵀ), as peft's AdaLoraModel.forward computes it, in the parameters'
    dtype. Differentiable: the caller adds w·R to the loss it backpropagates."""
    tuner = adalora_tuner(model)
    assert tuner is not None, "orth_regularizer needs an AdaLoRA model"
    name = tuner.trainable_adapter_name
    terms = []
    for n, p in tuner.model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and name in n:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
            terms.append(torch.linalg.matrix_norm(cov - eye))
    return torch.stack(terms).mean()


class RankAllocation:
    """One run's use of peft's RankAllocator; `total` is the run's optimizer steps."""

    def __init__(self, model: torch.nn.Module, total: int):
        tuner = adalora_tuner(model)
        assert tuner is not None
        self.tuner, self.allocator = tuner, tuner.rankallocator
        self.config = tuner.peft_config[tuner.trainable_adapter_name]
        if self.config.tinit + self.config.tfinal >= total:
            raise LLMTrainError(
                f"model.peft: tinit {self.config.tinit} + tfinal {self.config.tfinal} leaves no "
                f"step of the run's {total} to reallocate ranks in; make them smaller than "
                f"{total} together, or train longer"
            )
        self.allocator.set_total_step(total)  # the config object peft saves in adapter/

    @classmethod
    def attach(cls, model: torch.nn.Module, total: int) -> RankAllocation | None:
        """The allocation of an AdaLoRA model; None for any other model."""
        return cls(model, total) if adalora_tuner(model) is not None else None

    def step(self, step: int) -> None:
        """After optimizer step `step` (0-based) has updated the weights and before its
        gradients are zeroed: importance scores from the step's complete gradients, then the
        budget's masks. This is where peft's own example calls it (loss.backward();
        optimizer.step(); update_and_allocate(step); optimizer.zero_grad())."""
        self.tuner.update_and_allocate(step)

    def budget(self, step: int) -> int:
        """The total rank budget (sum over adapted matrices) the schedule sets at `step`."""
        return int(self.allocator.budget_schedule(step)[0])

    def finish(self) -> None:
        """Zero the singular values the final pattern pruned (the optimizer may have moved
        them since the last mask), so `final/` merges what `adapter/` keeps."""
        if self.config.rank_pattern:
            self.allocator.mask_using_rank_pattern(self.tuner.model, self.config.rank_pattern)

    def state_dict(self) -> dict[str, Any]:
        """Importance scores, their moving averages and the rank pattern (the masks it
        applied): tensors and plain values only, on CPU."""
        state: dict[str, Any] = {
            key: {n: t.detach().cpu().clone() for n, t in getattr(self.allocator, key).items()}
            for key in _SCORES
        }
        pattern = self.config.rank_pattern
        state["rank_pattern"] = {k: list(v) for k, v in pattern.items()} if pattern else None
        return state

    def load_state_dict(self, state: Any, where: str = "the checkpoint") -> None:
        """Put a `state_dict` back; a missing or malformed one is an error naming `where`."""
        if not isinstance(state, dict) or any(not isinstance(state.get(k), dict) for k in _SCORES):
            raise LLMTrainError(
                f"{where}: holds no AdaLoRA allocator state; was it written with another "
                "model.peft.method?"
            )
        params = dict(self.tuner.model.named_parameters())
        for key in _SCORES:
            scores = {n: t.to(params[n].device) for n, t in state[key].items() if n in params}
            if len(scores) != len(state[key]):
                raise LLMTrainError(f"{where}: the AdaLoRA scores do not match the model")
            setattr(self.allocator, key, scores)
        pattern = state.get("rank_pattern")
        self.config.rank_pattern = {k: list(v) for k, v in pattern.items()} if pattern else None
