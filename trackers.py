"""Experiment trackers for a training run: TensorBoard always (RUN/tb/), Weights & Biases on request.

    trackers = Trackers(run_dir, config, wandb_project="map-dit", start_step=step, enabled=rank == 0)
    trackers.scalars({"train/loss": 0.12, "train/lr": 1e-2}, step)
    trackers.image("samples", grid, step)       # uint8 (H, W, 3)
    trackers.close()

Only rank 0 writes (enabled=False gives a tracker that does nothing). W&B is an optional
dependency: wandb_installed() says whether --wandb can work; WANDB_MODE=offline writes the run
under RUN/wandb/ for a later `wandb sync`. A resumed run continues the same W&B run (its id is kept
in RUN/wandb-id.txt) and drops the TensorBoard events past the step it resumes from. W&B plots
against the training step logged as the metric "train_step", and its own step only counts the log
calls: W&B ignores a log(step=s) below its current step, which after a resume is the run's last
logged step + 1, so the re-trained steps would go missing there.
"""
import importlib.util
import os
import uuid

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
        with open(path + ".tmp", "w") as f:
            f.write(uuid.uuid4().hex[:12])
        os.replace(path + ".tmp", path)
    with open(path) as f:
        return f.read().strip()
