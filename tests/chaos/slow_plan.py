"""A custom training plan that sleeps a little per batch, so faults land mid-round for sure.

It travels to the nodes as source text (the custom-plan path), like a researcher's own plan.
"""

import time

from common.training.zoo import MLPPlan


class SlowMLP(MLPPlan):
    def training_step(self, model, x, y):
        time.sleep(float(self.training_args.get("step_delay_s", 0.0)))
        return super().training_step(model, x, y)
