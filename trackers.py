"""Experiment trackers for a training run: TensorBoard always (RUN/tb/), Weights & Biases on request.

    trackers = Trackers(run_dir, config, wandb_project="map-dit", start_step=step, enabled=rank == 0)
    trackers.scalars({"train/loss": 0.12, "train/lr": 1e-2}, step)
    trackers.image("samples", grid, step)       # uint8 (H, W, 3)
    trackers.close()

enabled=False gives trackers that do nothing. WANDB_MODE=offline writes the W&B run under RUN/wandb/
for a later `wandb sync`. A resumed run continues the same W&B run (its id kept in RUN/wandb-id.txt)
and drops the TensorBoard events past the step it resumes from. W&B charts plot against the metric
"train_step": W&B ignores a log(step=s) below its own step, so re-trained steps would go missing.
"""
import importlib.util
import os
import uuid

from data import write_text

WANDB_STEP = "train_step"  # the x-axis of every W&B chart


def wandb_installed():
    return importlib.util.find_spec("wandb") is not None


class Trackers:
    def __init__(self, run_dir, config, wandb_project=None, start_step=0, enabled=True):
        self.tb = self.wandb = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
        self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start_step + 1 if start_step else None)
        if wandb_project:
            import wandb
            self.wandb = wandb.init(project=wandb_project, dir=run_dir, config=config, id=wandb_run_id(run_dir),
                                    name=os.path.basename(os.path.normpath(run_dir)), resume="allow")
            self.wandb.define_metric(WANDB_STEP)
            self.wandb.define_metric("*", step_metric=WANDB_STEP)

    def scalars(self, values, step):
        """values: {tag: number}, e.g. {"train/loss": 0.12}."""
        if self.tb is None:
            return
        for tag, value in values.items():
            self.tb.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log({**values, WANDB_STEP: step})

    def image(self, tag, image, step):
        """image: uint8 numpy (H, W, 3)."""
        if self.tb is None:
            return
        self.tb.add_image(tag, image, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb
            self.wandb.log({tag: wandb.Image(image), WANDB_STEP: step})

    def flush(self):
        if self.tb is not None:
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            import wandb
            self.wandb.finish()
            wandb.teardown()  # waits for W&B's service process to write the run out (finish alone may not)
        self.tb = self.wandb = None


def wandb_run_id(run_dir):
    """The run's W&B id, created on first use and kept in RUN/wandb-id.txt (a resumed run reuses it)."""
    path = os.path.join(run_dir, "wandb-id.txt")
    if not os.path.exists(path):
        write_text(path, uuid.uuid4().hex[:12])
    with open(path) as f:
        return f.read().strip()
