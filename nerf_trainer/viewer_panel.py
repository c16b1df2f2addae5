"""The in2n panel's fields in nerfstudio's viewer (instruction, text and image guidance), applied at once.

nerfstudio runs a panel field's callback under the trainer's train lock, which the training loop holds for
each step and the viewer's render thread for each render of the 3D view; on a CPU a render at the viewer's
default 512 pixels holds it for minutes, and a change typed into the panel waited that long (seen: more than
three minutes, a Chromium and a trainer on two shared cores). These fields' callback only sets the three values
the next edit request is built from, so they call it straight from the viewer's message thread, without the
lock (and without nerfstudio's re-render of the 3D view, which these values do not change).
"""

from __future__ import annotations

from nerfstudio.viewer.viewer_elements import ViewerNumber, ViewerText


class _CallbackWithoutTrainLock:
    """Mixin for a nerfstudio ViewerParameter: its callback is the one given at construction, called without the
    train lock (nerfstudio re-assigns `cb_hook` with a locked wrapper after install; that wrapper is not called)."""

    def install(self, viser_server) -> None:  # type: ignore[no-untyped-def]
        self._create_gui_handle(viser_server)  # type: ignore[attr-defined]
        callback = self.cb_hook  # type: ignore[attr-defined]
        self.gui_handle.on_update(lambda _event: callback(self))  # type: ignore[attr-defined]


class PanelText(_CallbackWithoutTrainLock, ViewerText):
    """A text field of the in2n panel."""


class PanelNumber(_CallbackWithoutTrainLock, ViewerNumber):
    """A number field of the in2n panel."""
