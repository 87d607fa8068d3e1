"""dpalign trainers: the DP gradient engine, the three stage recipes, data, models and rollout actors."""
