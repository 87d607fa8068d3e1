"""dpalign: the learned clip/noise controller (docs/design.md section 3).

Public API:
  * ``controller.records``: ``Released``, ``LedgerState``, ``ValidationStats`` (all the controller may observe);
  * ``controller.spaces``: ``SpaceSpec`` (depth buckets), ``features_from_released`` (feature table in its doc);
  * ``controller.budget``: ``BudgetGuard`` (sigma floor under the RDP filter, ``safe_action``), ``BudgetExhausted``;
  * ``controller.policy``: ``LearnedController`` (the engine's ClipNoisePolicy), ``released_from_engine``,
    ``controller_policy_factory`` (for ``StageContext.policy_factory``);
  * ``controller.config``: ``ControllerConfig``, ``ProxyEnvConfig``;
  * ``controller.artifact``: ``load_artifact``, ``save_artifact``, ``ControllerArtifact``, ``MLPActor``, ``ObsNorm``,
    ``Provenance``;
  * ``controller.env``: ``ProxyDPEnv`` (gymnasium, proxy DP fine-tuning on public text with the real engine);
  * ``controller.sb3``: ``OnlineSAC``, ``train_sb3``; ``controller.rllib``: ``pretrain_rllib``.
Heavy imports (torch, SB3, Ray) stay inside the submodules that need them.
"""
