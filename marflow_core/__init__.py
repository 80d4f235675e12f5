"""marflow_core: reflow, PeRFlow and the marginal-alignment regularizer for few-step flow students.

Conventions (docs/method.md, section 1): ``t = 0`` is noise, ``t = 1`` is data, ``x_t = (1 - t) x0 + t x1``.
"""

from .divergence import (
    batch_jacobian,
    default_jacobian_method,
    divergence_fn,
    exact_divergence,
    hutchinson_divergence,
    sample_probes,
)
from .errors import CheckpointError, InvalidParameter, NonFiniteLossError, NonFiniteOutputError
from .flow_map import (
    FlowMapDistillationObjective,
    FlowMapMatchingObjective,
    TwoTimeMLP,
    compose,
    compose_with_logdet,
)
from .local_flow import (
    BlockwiseField,
    LocalFlowChain,
    LocalFlowDistillationObjective,
    LocalFlowMatchingObjective,
)
from .logdensity import FlowWithLogDet, euler_map_with_logdet, flow_with_logdet
from .marginal import MAConfig, delta_field, ma_surrogate, ma_value_estimate, ma_value_rate
from .models import TimeMLP, TimeMLPConfig, VelocityField
from .objectives import DistillationObjective, FlowMatchingObjective, LossTerms, Objective
from .perflow import PeRFlowConfig, PeRFlowSampler
from .reflow import ReflowPairConfig, ReflowPairSampler, generate_reflow_pairs, load_pairs
from .seeding import derive_seed, stream
from .solvers import odeint_adaptive, odeint_fixed, uniform_grid
from .teachers import GaussianMixtureTeacher, Teacher, VelocityTeacher, score_from_velocity
from .training import TrainConfig, TrainResult, load_checkpoint, train
from .trajectory import (
    TrajectoryDistance,
    WindowBatch,
    sample_few_step,
    squared_distance,
    trajectory_matching_loss,
)
from .window_bank import (
    WindowBankConfig,
    WindowBankSampler,
    generate_window_bank,
    load_window_bank,
)
from .windows import TimeWindows, segment_point, segment_velocity

__all__ = [
    "FlowMapDistillationObjective",
    "FlowMapMatchingObjective",
    "TwoTimeMLP",
    "compose",
    "compose_with_logdet",
    "BlockwiseField",
    "LocalFlowChain",
    "LocalFlowDistillationObjective",
    "LocalFlowMatchingObjective",
    "CheckpointError",
    "DistillationObjective",
    "FlowMatchingObjective",
    "FlowWithLogDet",
    "GaussianMixtureTeacher",
    "InvalidParameter",
    "LossTerms",
    "MAConfig",
    "NonFiniteLossError",
    "NonFiniteOutputError",
    "Objective",
    "PeRFlowConfig",
    "PeRFlowSampler",
    "ReflowPairConfig",
    "ReflowPairSampler",
    "Teacher",
    "TimeMLP",
    "TimeMLPConfig",
    "TimeWindows",
    "TrainConfig",
    "TrainResult",
    "TrajectoryDistance",
    "VelocityField",
    "VelocityTeacher",
    "WindowBankConfig",
    "WindowBankSampler",
    "WindowBatch",
    "batch_jacobian",
    "default_jacobian_method",
    "delta_field",
    "derive_seed",
    "divergence_fn",
    "euler_map_with_logdet",
    "exact_divergence",
    "flow_with_logdet",
    "generate_reflow_pairs",
    "generate_window_bank",
    "hutchinson_divergence",
    "load_checkpoint",
    "load_pairs",
    "load_window_bank",
    "ma_surrogate",
    "ma_value_estimate",
    "ma_value_rate",
    "odeint_adaptive",
    "odeint_fixed",
    "sample_few_step",
    "sample_probes",
    "score_from_velocity",
    "segment_point",
    "squared_distance",
    "segment_velocity",
    "stream",
    "train",
    "trajectory_matching_loss",
    "uniform_grid",
]
__version__ = "0.1.0"
