"""Capture: forward hooks → rows (torch).

:mod:`monitor.capture.rows` turns a module's output into a subsampled ``(n, d)`` batch of rows
(token and spatial pooling, class ids, the monitor's own generators, finding activation layers);
:mod:`monitor.capture.hooks` holds the forward hooks that feed a :class:`CaptureTarget`, and the
``torch.compile`` custom op they call inside compiled graphs.
"""

from monitor.capture.hooks import ActivationCapture, Capture, CaptureTarget
from monitor.capture.rows import (
    ACTIVATION_TYPES,
    Batch,
    Generators,
    class_ids,
    default_stream_name,
    find_activations,
    first_tensor,
    prepare_batch,
    subsample,
    to_rows,
    unit_rows,
)

__all__ = ["ACTIVATION_TYPES", "ActivationCapture", "Batch", "Capture", "CaptureTarget",
           "Generators", "class_ids", "default_stream_name", "find_activations", "first_tensor",
           "prepare_batch", "subsample", "to_rows", "unit_rows"]
