"""`flax.linen.BatchNorm`'s semantics in Equinox's explicit-state style.

The module `BatchNorm` (state: `BatchStats`); the functional core `batch_statistics`
(returning `BatchStatistics`), `normalize`, `update_running_average`; `recompute_statistics`
(precise BN), `fold_into`, `fold_sequential`; the converters `from_flax`, `to_flax`,
`from_nnx`, `to_nnx`, `from_torch`, `from_equinox`, `from_equinox_model`; `BatchNormError`.
"""

from ._adoption import from_equinox_model as from_equinox_model
from ._adoption import from_nnx as from_nnx
from ._adoption import to_nnx as to_nnx
from ._batch_norm import BatchNorm as BatchNorm
from ._batch_norm import BatchStats as BatchStats
from ._errors import BatchNormError as BatchNormError
from ._folding import fold_into as fold_into
from ._folding import fold_sequential as fold_sequential
from ._functional import BatchStatistics as BatchStatistics
from ._functional import batch_statistics as batch_statistics
from ._functional import normalize as normalize
from ._functional import update_running_average as update_running_average
from ._interop import from_equinox as from_equinox
from ._interop import from_flax as from_flax
from ._interop import from_torch as from_torch
from ._interop import to_flax as to_flax
from ._precise import recompute_statistics as recompute_statistics

__version__ = "0.1.0"
