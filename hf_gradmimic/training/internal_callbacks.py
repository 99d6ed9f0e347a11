"""The trainer's own callbacks, run at every `Trainer` event but kept out of the user's callback list.

`MimicTrainer` works through callbacks (the score log, the non-finite step guard, the end of each step...). Added
with ``add_callback`` they would show in ``trainer.callback_handler.callbacks`` and its ``callback_list``, where
code written for `Trainer` looks for its own (``pop_callback``, ``remove_callback``, tests that compare the list).
`hide_internal_callbacks` gives the trainer a handler that runs them after the listed ones, as ``add_callback``
would have placed them, without listing them.
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler


class InternalCallbackHandler(CallbackHandler):
    """A `CallbackHandler` that also runs ``internal`` callbacks, after the listed ones, without listing them."""

    internal: list[TrainerCallback]

    def call_event(self, event: str, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        control = super().call_event(event, args, state, control, **kwargs)
        listed, self.callbacks = self.callbacks, self.internal
        try:  # the base class's own dispatch, so the internal ones get exactly the arguments the others got
            return super().call_event(event, args, state, control, **kwargs)
        finally:
            self.callbacks = listed


def hide_internal_callbacks(handler: CallbackHandler, internal: list[TrainerCallback]) -> InternalCallbackHandler:
    """``handler`` (with its listed callbacks, model, optimizer...) as an `InternalCallbackHandler` running
    ``internal`` too; a handler that already is one gets its internal callbacks replaced (a rebuilt set-up)."""
    hidden = handler
    if not isinstance(handler, InternalCallbackHandler):
        hidden = InternalCallbackHandler.__new__(InternalCallbackHandler)
        hidden.__dict__.update(handler.__dict__)
    hidden.internal = list(internal)
    return hidden
