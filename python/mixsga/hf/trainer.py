"""Logging the aux loss under transformers' ``Trainer`` (and TRL's trainers, which subclass it).

The routers train under an unmodified Trainer (the aux loss reaches them through backward, mixsga.hf.hooks);
this callback only adds the aux loss to the Trainer's logs, next to ``loss``.
"""

from __future__ import annotations

from transformers import TrainerCallback

from .layers import aux_loss, mixsga_layers


class AuxLossCallback(TrainerCallback):
    """Logs ``aux_loss``: the mean, over the optimizer steps since the last log, of the model's aux loss (the
    mean over its mixSGA layers of aux_alpha * L_aux) in the last micro-batch of each step.
    ``Trainer(..., callbacks=[mixsga.hf.AuxLossCallback()])``."""

    def __init__(self) -> None:
        self._values: list[float] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and mixsga_layers(model):
            self._values.append(float(aux_loss(model)))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or not self._values:
            return
        value = sum(self._values) / len(self._values)
        self._values.clear()
        logs["aux_loss"] = value
        # The Trainer appended its copy of these logs to the history before calling back.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["aux_loss"] = value
