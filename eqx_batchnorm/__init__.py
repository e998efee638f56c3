"""`flax.linen.BatchNorm`'s semantics in Equinox's explicit-state style.

Every public name is imported below; `docs/api.md` documents them.
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
from ._interop import deserialise_filter_spec as deserialise_filter_spec
from ._interop import from_equinox as from_equinox
from ._interop import from_flax as from_flax
from ._interop import from_torch as from_torch
from ._interop import to_flax as to_flax
from ._precise import recompute_statistics as recompute_statistics
from ._scan import scan_blocks as scan_blocks
from ._scan import stack_blocks as stack_blocks

__version__ = "0.1.1"
