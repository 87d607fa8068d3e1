"""The DP gradient engine: Poisson-sampled users -> per-user gradients -> per-group clipping -> noise -> update.

Public API:
  * ``trainers.engine.engine``: ``DPEngine`` (``step``, ``per_user_gradients``, ``clip_and_sum``,
    ``microbatches``, ``groups``, ``expected_batch_size``, ``close``), ``UserBatch``, ``StepResult``,
    ``clipping_groups``, ``trainable_named_parameters``, ``RecordIndependenceError``, ``FrozenAdapterError``,
    and the hook types ``ReduceFn``, ``ApplyFn``, ``EventSink``, ``AdmitFn``, ``LossFn``;
  * ``trainers.engine.policy``: ``ClipNoisePolicy`` (protocol), ``StepPlan``, ``ReleasedStep``, ``GroupSpec``,
    ``FixedPolicy``, ``PerLayerFixedPolicy``, ``AdaptiveClippingPolicy``;
  * ``trainers.engine.sampling``: ``PoissonUserSampler``, ``step_seed``, ``release_generator``;
  * ``trainers.engine.per_user``: ``PerUserGradCollector``, ``per_record_grads``,
    ``check_no_cross_example_modules``, ``CrossExampleModuleError``.
"""

from trainers.engine.engine import DPEngine, StepResult, UserBatch
from trainers.engine.policy import (
    AdaptiveClippingPolicy,
    ClipNoisePolicy,
    FixedPolicy,
    GroupSpec,
    PerLayerFixedPolicy,
    ReleasedStep,
    StepPlan,
)
from trainers.engine.sampling import PoissonUserSampler, release_generator, step_seed

__all__ = [
    "AdaptiveClippingPolicy",
    "ClipNoisePolicy",
    "DPEngine",
    "FixedPolicy",
    "GroupSpec",
    "PerLayerFixedPolicy",
    "PoissonUserSampler",
    "ReleasedStep",
    "StepPlan",
    "StepResult",
    "UserBatch",
    "release_generator",
    "step_seed",
]
