"""`flax.linen.BatchNorm`'s semantics in Equinox's explicit-state style.

Public names: `BatchNorm` (the module), its state `BatchStats`, the functional core
(`batch_statistics`, `normalize`, `update_running_average`) and `BatchNormError`.
"""

from ._batch_norm import BatchNorm as BatchNorm
from ._batch_norm import BatchStats as BatchStats
from ._errors import BatchNormError as BatchNormError
from ._normalization import normalize as normalize
from ._statistics import BatchStatistics as BatchStatistics
from ._statistics import batch_statistics as batch_statistics
from ._statistics import update_running_average as update_running_average

__version__ = "0.1.0"
